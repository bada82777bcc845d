"""timm ``SwinTransformer`` (v1): four stages of windowed-attention blocks on (B, H, W, C)
maps, strides 4/8/16/32; each block has a fused ``attn.qkv`` and a ViT-style MLP."""

from __future__ import annotations

from torch import nn

from ._stages import child_names, timm_stage_info
from .base import BlockParts, HostFamily, HostSpec, stage_spec
from .registry import register_host

NAME = "timm.SwinTransformer"


def _matches(model: nn.Module) -> bool:
    try:
        from timm.models.swin_transformer import SwinTransformer
    except ImportError:
        return False
    return isinstance(model, SwinTransformer)


def _describe(model: nn.Module) -> HostSpec:
    info = timm_stage_info(model, NAME)
    stages = []
    for index, stage in enumerate(model.layers):
        width, stride = info[f"layers.{index}"]
        stages.append((child_names(f"layers.{index}.blocks", stage.blocks), width, stride))
    parts = BlockParts(mlp="mlp", mlp_input="norm2", qkv="attn.qkv", attention="attn")
    return stage_spec(NAME, stages, layout="BHWC", parts=parts)


register_host(
    HostFamily(NAME, _matches, _describe, example='timm.create_model("swin_base_patch4_window7_224")')
)
