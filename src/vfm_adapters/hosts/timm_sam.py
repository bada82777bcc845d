"""timm ``VisionTransformerSAM``: SAM's image encoder, spatial (B, H, W, C) windowed blocks."""

from __future__ import annotations

from torch import nn

from .base import BlockParts, HostFamily, HostSpec, module_names, patch_size_of
from .registry import register_host


def _matches(model: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer_sam import VisionTransformerSAM
    except ImportError:
        return False
    return isinstance(model, VisionTransformerSAM)


def _describe(model: nn.Module) -> HostSpec:
    blocks = list(model.blocks)
    global_blocks = tuple(i for i, block in enumerate(blocks) if getattr(block, "window_size", 0) == 0)
    return HostSpec(
        family="timm.VisionTransformerSAM",
        block_names=module_names(model, model.blocks),
        embed_dim=int(blocks[0].norm1.normalized_shape[0]),
        num_prefix_tokens=0,
        patch_size=patch_size_of(model.patch_embed.patch_size),
        layout="BHWC",
        parts=BlockParts(mlp="mlp", mlp_input="norm2", qkv="attn.qkv", attention="attn"),
        global_blocks=global_blocks,
    )


register_host(
    HostFamily("timm.VisionTransformerSAM", _matches, _describe, example='timm.create_model("samvit_huge_patch16")')
)
