"""transformers ``ConvNextModel``: four stages ``encoder.stages.i.layers`` of ConvNeXt
layers on (B, C, H, W) maps, strides 4/8/16/32.

The layer's MLP is two bare ``Linear`` layers with no module around them, so AdaptFormer
finds no MLP part here (timm's ConvNeXt has one).
"""

from __future__ import annotations

from torch import nn

from ._lookup import is_instance_of
from ._stages import child_names
from .base import HostFamily, HostSpec, stage_spec
from .registry import register_host

NAME = "transformers.ConvNextModel"


def _describe(model: nn.Module) -> HostSpec:
    config = model.config
    stages, stride = [], 4  # the stem is a 4x4 patchify convolution
    for index, (stage, width) in enumerate(zip(model.encoder.stages, config.hidden_sizes)):
        stride = 4 if index == 0 else stride * 2  # every later stage starts with a 2x2 downsampling
        stages.append((child_names(f"encoder.stages.{index}.layers", stage.layers), int(width), stride))
    return stage_spec(NAME, stages, layout="NCHW")


register_host(
    HostFamily(
        NAME,
        lambda m: is_instance_of(m, ("ConvNextModel",)),
        _describe,
        example='ConvNextModel.from_pretrained("facebook/convnext-large-224-22k")',
    )
)
