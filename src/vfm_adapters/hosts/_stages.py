"""Helpers shared by the stage-wise (hierarchical) families: timm's ``feature_info`` gives
each stage's width and stride, so a family only says where each stage's blocks are."""

from __future__ import annotations

from torch import nn

from .base import UnsupportedModelError


def timm_stage_info(model: nn.Module, family: str) -> dict[str, tuple[int, int]]:
    """``{module name: (channels, stride)}`` from a timm model's ``feature_info``."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise UnsupportedModelError(f"{family}: {type(model).__name__} has no timm feature_info to read stage widths from")
    return {entry["module"]: (int(entry["num_chs"]), int(entry["reduction"])) for entry in info}


def child_names(prefix: str, container: nn.Module) -> list[str]:
    """Qualified names of ``container``'s children, ``container`` being ``prefix`` in the model."""
    return [f"{prefix}.{name}" for name, _ in container.named_children()]
