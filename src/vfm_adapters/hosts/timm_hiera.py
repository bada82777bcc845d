"""timm ``HieraDet``: SAM 2's Hiera image encoder (``sam2_hiera_tiny`` ... ``_large``).

One ``blocks`` sequence split into four stages at ``stage_ends``; blocks work on
(B, H, W, C) maps, strides 4/8/16/32. The first block of a stage widens the features
(a ``proj`` on its shortcut) and pools queries, so every block *output* of a stage has
the stage's width. timm's MAE ``Hiera`` keeps tokens in an unrolled order instead and is
not described here.
"""

from __future__ import annotations

from torch import nn

from .base import BlockParts, HostFamily, HostSpec, stage_spec
from .registry import register_host

NAME = "timm.HieraDet"


def _matches(model: nn.Module) -> bool:
    try:
        from timm.models.hieradet_sam2 import HieraDet
    except ImportError:
        return False
    return isinstance(model, HieraDet)


def _describe(model: nn.Module) -> HostSpec:
    strides = {entry["module"]: int(entry["reduction"]) for entry in model.feature_info}
    stages, start = [], 0
    for end in model.stage_ends:
        names = [f"blocks.{i}" for i in range(start, end + 1)]
        stages.append((names, int(model.blocks[end].dim_out), strides[f"blocks.{end}"]))
        start = end + 1
    parts = BlockParts(mlp="mlp", mlp_input="norm2", qkv="attn.qkv", attention="attn")
    return stage_spec(NAME, stages, layout="BHWC", parts=parts)


register_host(HostFamily(NAME, _matches, _describe, example='timm.create_model("sam2_hiera_large")'))
