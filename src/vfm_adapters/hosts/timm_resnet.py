"""timm ``ResNet`` (resnet50, the deep-stem resnet50c/d closest to mmseg's ResNetV1c, ...):
four stages ``layer1..layer4`` of residual blocks on (B, C, H, W) maps, strides 4/8/16/32."""

from __future__ import annotations

from torch import nn

from ._stages import child_names, timm_stage_info
from .base import HostFamily, HostSpec, stage_spec
from .registry import register_host

NAME = "timm.ResNet"


def _matches(model: nn.Module) -> bool:
    try:
        from timm.models.resnet import ResNet
    except ImportError:
        return False
    return isinstance(model, ResNet)


def _describe(model: nn.Module) -> HostSpec:
    info = timm_stage_info(model, NAME)
    stages = []
    for index in range(1, 5):
        name = f"layer{index}"
        if name in info:
            width, stride = info[name]
            stages.append((child_names(name, getattr(model, name)), width, stride))
    # No attention and no token MLP: LoRA, AdaptFormer and VPT find no part to attach to.
    return stage_spec(NAME, stages, layout="NCHW")


register_host(HostFamily(NAME, _matches, _describe, example='timm.create_model("resnet50c")'))
