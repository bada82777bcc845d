"""AdaptFormer (Chen et al., "AdaptFormer: Adapting Vision Transformers for Scalable Visual
Recognition", NeurIPS 2022): a bottleneck MLP in parallel to each block's MLP.

Per block, with ``x`` the residual stream after attention (the input of the block's
second norm) and ``s`` a fixed scale::

    mlp_out <- mlp_out + s * up(relu(down(x)))        down: Linear(c, d), up: Linear(d, c)

The Rein paper's baseline: bottleneck ``d = 64``, ``s = 0.1``, no adapter LayerNorm,
``(c*d + d + d*c + c) * L`` parameters (3,171,840 on DINOv2-L). ``up`` starts at zero
(weight and bias) and ``down``'s bias at zero, so the model is unchanged right after
injection; ``down``'s weight keeps PyTorch's default Linear init.

Attachment: a forward pre-hook on the host part ``mlp_input`` (the block's second norm)
captures its input, and a forward hook on the host part ``mlp`` adds the adapter's
output to the MLP's. If the host scales the MLP branch afterwards (DINOv2's layer scale),
the adapter's output is scaled with it, as an addition to the MLP output implies. The
layers act on the last dimension, so spatial ``(B, H, W, C)`` hosts (SAM) work too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..hosts import HostSpec, UnsupportedModelError
from .base import AdapterMethod, Attachment, MethodConfig, inject, register_method


@dataclass
class AdaptFormerConfig(MethodConfig):
    """AdaptFormer's options; the defaults are the Rein paper's baseline.

    Attributes:
        bottleneck: Width ``d`` of the bottleneck (64).
        scale: Fixed factor ``s`` on the adapter's output (0.1).
    """

    bottleneck: int = 64
    scale: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck < 1:
            raise ValueError(
                f"AdaptFormerConfig.bottleneck must be a positive integer (e.g. 16, 64), got {self.bottleneck!r}"
            )
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ValueError(f"AdaptFormerConfig.scale must be a finite number (e.g. 0.1), got {self.scale!r}")
        self.scale = float(self.scale)


class Bottleneck(nn.Module):
    """``scale * up(relu(down(x)))`` on the last dimension; zero output at init.

    Example:
        >>> adapter = Bottleneck(8, 4, scale=0.1)
        >>> bool(adapter(torch.randn(2, 5, 8)).abs().max() == 0)
        True
    """

    def __init__(
        self, embed_dim: int, bottleneck: int, scale: float, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(embed_dim, bottleneck, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck, embed_dim, device=device, dtype=dtype)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(torch.relu(self.down(x))) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class AdaptFormer(nn.Module):
    """One :class:`Bottleneck` per block; ``embed_dim`` is one width or one per block (stage-wise hosts).

    Example:
        >>> adapters = AdaptFormer(24, 1024, AdaptFormerConfig(), device="meta")
        >>> sum(p.numel() for p in adapters.parameters())
        3171840
    """

    def __init__(
        self, num_layers: int, embed_dim: int | Sequence[int], config: AdaptFormerConfig,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        widths = [embed_dim] * num_layers if isinstance(embed_dim, int) else list(embed_dim)
        if len(widths) != num_layers:
            raise ValueError(f"AdaptFormer got {len(widths)} widths for {num_layers} layers")
        self.adapters = nn.ModuleList(
            Bottleneck(width, config.bottleneck, config.scale, device=device, dtype=dtype) for width in widths
        )

    def forward(self, x: Tensor, layer: int) -> Tensor:
        return self.adapters[layer](x)


# Hooks are objects rather than closures, so ``copy.deepcopy(model)`` (an EMA teacher)
# maps them to the copy's adapters and slots instead of the original's.


class _CaptureResidual:
    """Forward pre-hook on ``mlp_input``: keeps its input (the residual after attention)."""

    def __init__(self, slots: dict[int, Tensor], layer: int) -> None:
        self.slots, self.layer = slots, layer

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            self.slots[self.layer] = args[0]
        else:
            self.slots[self.layer] = next(v for v in kwargs.values() if isinstance(v, Tensor))


class _AddToMlp:
    """Forward hook on ``mlp``: adds the adapter's output computed from the kept residual."""

    def __init__(self, adapters: AdaptFormer, slots: dict[int, Tensor], layer: int, where: str) -> None:
        self.adapters, self.slots, self.layer, self.where = adapters, slots, layer, where

    def __call__(self, module: nn.Module, args: tuple, output: Any):
        residual = self.slots.pop(self.layer, None)
        if residual is None:
            raise RuntimeError(
                f"AdaptFormer: block {self.layer}'s MLP ran before its {self.where!r} (the norm whose input is the "
                "residual stream after attention); this block layout is not supported"
            )
        if isinstance(output, tuple):
            return (output[0] + self.adapters(residual, self.layer), *output[1:])
        return output + self.adapters(residual, self.layer)


class AdaptFormerMethod(AdapterMethod):
    name = "adaptformer"
    config_class = AdaptFormerConfig

    def check(self, model: nn.Module, host: HostSpec, config: AdaptFormerConfig) -> None:
        for part in ("mlp", "mlp_input"):
            if getattr(host.parts, part) is None:
                raise UnsupportedModelError(
                    f"AdaptFormer attaches beside each block's MLP, but host family {host.family!r} exposes no "
                    f"{part!r} part" + (" (its blocks are convolutions with no token MLP; use Rein)" if host.layout == "NCHW" else "")
                )

    def attach(self, model: nn.Module, host: HostSpec, config: AdaptFormerConfig, attachment: Attachment) -> None:
        reference = next(model.parameters())
        adapters = AdaptFormer(
            host.depth, host.block_widths(), config, device=reference.device,
            dtype=reference.dtype if reference.is_floating_point() else None,
        )
        attachment.module = adapters
        slots: dict[int, Tensor] = {}
        attachment.extra["slots"] = slots  # emptied by the hooks as they go
        for layer, block in enumerate(host.blocks(model)):
            norm = host.block_part(block, "mlp_input")
            mlp = host.block_part(block, "mlp")
            attachment.handles.append(norm.register_forward_pre_hook(_CaptureResidual(slots, layer), with_kwargs=True))
            attachment.handles.append(mlp.register_forward_hook(_AddToMlp(adapters, slots, layer, host.parts.mlp_input)))


register_method(AdaptFormerMethod())


def inject_adaptformer(
    model: nn.Module,
    *,
    bottleneck: int = 64,
    scale: float = 0.1,
    freeze_host: bool = True,
    trainable: Sequence[str] | str | None = None,
) -> nn.Module:
    """Adds an AdaptFormer bottleneck beside every block's MLP, in place, and freezes the host.

    The defaults are the Rein paper's AdaptFormer baseline: bottleneck 64, scale 0.1, no
    adapter LayerNorm, fed by the residual stream after attention and added to the MLP's
    output (3,171,840 trainable parameters on DINOv2-L). The up-projection starts at
    zero, so the output is unchanged right after injection.

    Args:
        model: A supported ViT (SAM's spatial blocks included).
        bottleneck: Bottleneck width ``d``.
        scale: Fixed factor on the adapter output.
        freeze_host: Freeze every parameter that is not an adapter's.
        trainable: Module-name prefixes that stay trainable when the host is frozen
            (e.g. ``["head"]``; see :func:`vfm_adapters.methods.base.inject`).

    Returns:
        ``model``, now carrying AdaptFormer.

    Raises:
        ValueError: An invalid option (e.g. ``bottleneck=0``).
        UnsupportedModelError: The model is not a supported ViT.

    Example:
        >>> import timm, torch, vfm_adapters as va
        >>> vit = timm.create_model("vit_small_patch14_dinov2", depth=2, embed_dim=64,
        ...                         num_heads=2, img_size=56).eval()
        >>> x = torch.randn(1, 3, 56, 56)
        >>> before = vit(x)
        >>> torch.equal(va.inject_adaptformer(vit)(x), before)  # up-projection starts at zero
        True
        >>> va.trainable_parameters(vit)  # 2 * (64*64 + 64 + 64*64 + 64)
        16640
        >>> with torch.device("meta"):
        ...     big = timm.create_model("vit_large_patch14_dinov2")
        >>> va.trainable_parameters(va.inject_adaptformer(big))
        3171840
    """
    config = AdaptFormerConfig(bottleneck=bottleneck, scale=scale)
    return inject(model, "adaptformer", config, freeze_host=freeze_host, trainable=trainable)
