"""Rein on hierarchical (stage-wise) hosts: ResNet, ConvNeXt, Swin, SAM 2's Hiera.

As the Rein authors run it on ResNet and ConvNeXt: one :class:`~vfm_adapters.methods.rein.Rein`
per stage, with that stage's width, its own tokens and its own shared linears, scale and
query link, applied after every block of the stage to the block output flattened to
(B, H*W, C) (no prefix tokens). Each stage's Rein makes ``m`` object queries; the model's
queries are their sum.

Trainable parameters, per stage ``s`` with ``L_s`` blocks of width ``c_s`` (m tokens,
rank r, query width q; the ViT formula applied to each stage)::

    L_s*m*r + L_s*r*c_s + 2*(c_s*c_s + c_s) + 1 + (c_s*q + q) + (3*q*q + q)

summed over the stages (:func:`stage_rein_parameter_count`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..hosts import HostSpec
from ..kernels import unsupported_reason
from .base import AdapterError, Attachment
from .rein import Rein, ReinConfig

#: Patch size used in the token init bound when the config gives none: stage-wise hosts
#: have no patch, and the authors' Rein configs all use 16.
DEFAULT_PATCH_SIZE = 16


def stage_rein_parameter_count(
    stages: Sequence[tuple[int, int]], token_length: int = 100, rank: int | None = 16, query_dim: int = 256,
    link_queries: bool = True, learnable_scale: bool = True,
) -> int:
    """Trainable parameters of stage-wise Rein for ``(depth, width)`` stages.

    Example:
        >>> stage_rein_parameter_count([(3, 256), (4, 512), (6, 1024), (3, 2048)])  # ResNet-50
        13187588
    """
    m, r, q = token_length, rank, query_dim
    total = 0
    for depth, c in stages:
        tokens = depth * m * c if r is None else depth * m * r + depth * r * c
        total += tokens + 2 * (c * c + c) + int(learnable_scale)
        if link_queries:
            total += (c * q + q) + (3 * q * q + q)
    return total


class StageRein(nn.Module):
    """One :class:`Rein` per stage of a hierarchical host; the queries are summed.

    Args:
        stages: ``(depth, width)`` of each stage.
        config: Rein's options (the same for every stage).
        patch_size: Patch size in the token init bound.

    Example:
        >>> rein = StageRein([(2, 8), (2, 16)], ReinConfig(token_length=4, rank=2, query_dim=6), patch_size=16)
        >>> rein.queries().shape, rein.stages[1](torch.randn(1, 3, 3, 16), layer=0).shape
        (torch.Size([4, 6]), torch.Size([1, 3, 3, 16]))
    """

    def __init__(
        self, stages: Sequence[tuple[int, int]], config: ReinConfig, patch_size: int,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.stages = nn.ModuleList(Rein(depth, width, config, patch_size, device=device) for depth, width in stages)

    def queries(self) -> Tensor:
        """The sum of every stage's (m, query_dim) queries."""
        return torch.stack([stage.queries() for stage in self.stages]).sum(dim=0)

    def extra_repr(self) -> str:
        return f"stages={len(self.stages)}"


class _StageReinHook:
    """Forward hook on one block of a stage (an object, so ``deepcopy`` maps it to the copy's Rein)."""

    def __init__(self, rein: Rein, layer: int, layout: str) -> None:
        self.rein, self.layer, self.layout = rein, layer, layout

    def _refine(self, hidden: Tensor) -> Tensor:
        if self.layout == "NCHW":
            if hidden.ndim != 4:
                raise RuntimeError(f"Rein expected a (B, C, H, W) block output, got shape {tuple(hidden.shape)}")
            return self.rein(hidden.permute(0, 2, 3, 1), self.layer).permute(0, 3, 1, 2).contiguous()
        return self.rein(hidden, self.layer)  # (B, H, W, C) or (B, N, C) without prefix tokens

    def __call__(self, module: nn.Module, args: tuple, output):
        if isinstance(output, tuple):
            return (self._refine(output[0]), *output[1:])
        return self._refine(output)


def check_stages(host: HostSpec, config: ReinConfig) -> None:
    """Refuses options that have no meaning on a stage-wise host; changes nothing."""
    if config.layers is not None:
        raise AdapterError(
            f"Rein on the hierarchical host {host.family!r} refines every block of every stage (one Rein per "
            f"stage); ReinConfig.layers={config.layers!r} is for plain ViTs. Use layers=None"
        )
    if config.kernel == "triton":
        widths = [stage.width for stage in host.stages or ()]
        reasons = [unsupported_reason(width, config.token_length) for width in widths]
        why = next((reason for reason in reasons if reason is not None), None)
        if why is not None:
            raise AdapterError(
                f"kernel='triton' cannot take this host: {why}; this host's stages have widths {widths} and "
                f"token_length={config.token_length}. Use kernel='auto' (falls back to PyTorch) or kernel='torch'"
            )


def attach_stages(model: nn.Module, host: HostSpec, config: ReinConfig, attachment: Attachment) -> None:
    """Builds a :class:`StageRein` and hooks each stage's Rein after every block of the stage."""
    check_stages(host, config)
    stages = host.stages or ()
    reference = next(model.parameters())
    rein = StageRein(
        [(stage.depth, stage.width) for stage in stages], config,
        patch_size=config.patch_size or DEFAULT_PATCH_SIZE, device=reference.device,
    )
    attachment.module = rein
    attachment.extra["blocks"] = list(range(host.depth))
    for stage, stage_rein in zip(stages, rein.stages):
        for layer, name in enumerate(stage.block_names):
            block = model.get_submodule(name)
            attachment.handles.append(block.register_forward_hook(_StageReinHook(stage_rein, layer, host.layout)))
