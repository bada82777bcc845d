"""timm ``ConvNeXt`` (convnext_large, and the CLIP ConvNeXt-L ``convnext_large_mlp.clip_*``):
four stages of ConvNeXt blocks on (B, C, H, W) maps, strides 4/8/16/32.

A block runs depthwise conv -> norm -> MLP; with ``conv_mlp=False`` (the default) the
norm and MLP work channels-last, so AdaptFormer can sit beside the MLP (its input is the
norm's input, the output of the depthwise "token mixer").
"""

from __future__ import annotations

from torch import nn

from ._stages import child_names, timm_stage_info
from .base import BlockParts, HostFamily, HostSpec, stage_spec
from .registry import register_host

NAME = "timm.ConvNeXt"


def _matches(model: nn.Module) -> bool:
    try:
        from timm.models.convnext import ConvNeXt
    except ImportError:
        return False
    return isinstance(model, ConvNeXt)


def _describe(model: nn.Module) -> HostSpec:
    info = timm_stage_info(model, NAME)
    stages = []
    for index, stage in enumerate(model.stages):
        width, stride = info[f"stages.{index}"]
        stages.append((child_names(f"stages.{index}.blocks", stage.blocks), width, stride))
    channels_last = not getattr(model.stages[0].blocks[0], "use_conv_mlp", True)
    parts = BlockParts(mlp="mlp", mlp_input="norm") if channels_last else BlockParts()
    return stage_spec(NAME, stages, layout="NCHW", parts=parts)


register_host(HostFamily(NAME, _matches, _describe, example='timm.create_model("convnext_large")'))
