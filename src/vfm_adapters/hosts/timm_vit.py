"""timm ``VisionTransformer``: DINOv2 (with and without registers), CLIP, DeiT, AugReg ..."""

from __future__ import annotations

from torch import nn

from .base import BlockParts, HostFamily, HostSpec, module_names, patch_size_of
from .registry import register_host


def _matches(model: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return False
    return isinstance(model, VisionTransformer)


def _describe(model: nn.Module) -> HostSpec:
    # num_prefix_tokens counts CLS, registers and DeiT's distillation token.
    return HostSpec(
        family="timm.VisionTransformer",
        block_names=module_names(model, model.blocks),
        embed_dim=int(model.embed_dim),
        num_prefix_tokens=int(model.num_prefix_tokens),
        patch_size=patch_size_of(model.patch_embed.patch_size),
        layout="BNC",
        parts=BlockParts(mlp="mlp", mlp_input="norm2", qkv="attn.qkv", attention="attn"),
    )


register_host(
    HostFamily(
        "timm.VisionTransformer", _matches, _describe,
        example='timm.create_model("vit_large_patch14_dinov2.lvd142m")',
    )
)
