"""timm ``Eva``: EVA02 with rotary position embeddings, separate or fused q/k/v."""

from __future__ import annotations

from torch import nn

from .base import BlockParts, HostFamily, HostSpec, module_names, patch_size_of
from .registry import register_host


def _matches(model: nn.Module) -> bool:
    try:
        from timm.models.eva import Eva
    except ImportError:
        return False
    return isinstance(model, Eva)


def _describe(model: nn.Module) -> HostSpec:
    attn = model.blocks[0].attn
    fused = getattr(attn, "qkv", None) is not None
    projections = (
        dict(qkv="attn.qkv")
        if fused
        else dict(q="attn.q_proj", k="attn.k_proj", v="attn.v_proj")
    )
    # With q/v biases and the bias not added separately, EvaAttention computes
    # F.linear(x, self.qkv.weight, bias) and never calls the qkv layer.
    direct = ("qkv",) if fused and getattr(attn, "q_bias", None) is not None and not getattr(attn, "qkv_bias_separate", False) else ()
    return HostSpec(
        family="timm.Eva",
        block_names=module_names(model, model.blocks),
        embed_dim=int(model.embed_dim),
        num_prefix_tokens=int(model.num_prefix_tokens),
        patch_size=patch_size_of(model.patch_embed.patch_size),
        layout="BNC",
        parts=BlockParts(mlp="mlp", mlp_input="norm2", attention="attn", direct_weight_reads=direct, **projections),
    )


register_host(
    HostFamily("timm.Eva", _matches, _describe, example='timm.create_model("eva02_large_patch14_224.mim_in22k")')
)
