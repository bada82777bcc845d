"""Multi-layer feature maps from any supported host, with adapters active, and Rein's neck.

:class:`BackboneFeatures` runs the host and returns the outputs of chosen blocks as
``(B, C, H/p, W/p)`` maps. It captures them with forward hooks on the host's blocks
that are registered *at the start of every call* and removed at its end. PyTorch runs
a module's forward hooks in registration order, so these capture hooks always run
after every adapter hook already on the block (Rein's refinement, VPT's prompt
removal, ...): the features include the adapters' effect no matter whether the
adapters were injected before or after the feature extractor was built.

On a hierarchical host (ResNet, ConvNeXt, Swin, SAM 2's Hiera) the default features are
the outputs of each stage's last block, already at strides 4/8/16/32 with the stages'
widths; use neck scales ``(1, 1, 1, 1)`` there.

:class:`InterpolationNeck` turns the single-stride maps into the strides 4/8/16/32
that a multi-scale head expects the way the Rein authors do for DINOv2, EVA02 and
SAM: parameter-free bilinear resizing by x4, x2, x1, x0.5. :class:`MultiLevelNeck` is
the equivalent of mmseg's ``MultiLevelNeck`` (1x1 lateral convolution, bilinear
resize, 3x3 convolution), which their CLIP-L setup uses. :class:`MultiScaleNeck` is
a learnable neck of this library (transposed convolutions up, max pooling down, in
the style of ViTDet/BEiT); it is NOT the paper's and adds about 12.6M trainable
parameters at width 1024. :func:`build_neck` picks one by name (config key
``model.neck``).
"""

from __future__ import annotations

import inspect
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hosts import HostSpec, describe_host

#: Rein's blocks for a 24-block ViT-L.
REIN_LAYERS_24 = (7, 11, 15, 23)


def default_layers(depth: int) -> list[int]:
    """The blocks to take features from: [7, 11, 15, 23] for 24 blocks, the same depth fractions otherwise.

    Rein uses the outputs of blocks 8, 12, 16 and 24 of 24 (one third, half, two thirds
    and the end of the network); other depths keep those fractions (12 blocks give the
    ViT-B choice [3, 5, 7, 11]).

    Example:
        >>> default_layers(24), default_layers(12), default_layers(6)
        ([7, 11, 15, 23], [3, 5, 7, 11], [1, 2, 3, 5])
    """
    if depth < 1:
        raise ValueError(f"depth must be positive, got {depth}")
    return [max(int(round(depth * (index + 1) / 24)) - 1, 0) for index in REIN_LAYERS_24]


def _run_host(model: nn.Module, images: Tensor) -> None:
    if hasattr(model, "forward_features"):  # timm
        model.forward_features(images)
        return
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        PreTrainedModel = ()  # type: ignore[assignment]
    if isinstance(model, PreTrainedModel):
        kwargs = {}
        if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
            kwargs["interpolate_pos_encoding"] = True
        model(pixel_values=images, **kwargs)
        return
    model(images)


def stage_end_layers(host: HostSpec) -> list[int]:
    """The block index of the last block of every stage of a hierarchical host.

    Example:
        >>> import timm
        >>> from vfm_adapters.hosts import describe_host
        >>> with torch.device("meta"):
        ...     resnet = timm.create_model("resnet50")
        >>> stage_end_layers(describe_host(resnet))
        [2, 6, 12, 15]
    """
    if host.stages is None:
        raise ValueError(f"host family {host.family!r} has no stages")
    ends, total = [], 0
    for stage in host.stages:
        total += stage.depth
        ends.append(total - 1)
    return ends


class BackboneFeatures(nn.Module):
    """Feature maps ``(B, C, H/p, W/p)`` of chosen blocks of a host ViT (or of each stage).

    Prefix tokens (CLS, registers) are dropped; spatial (``BHWC``) hosts such as SAM
    are permuted to channels-first. If a block emits more tokens than the patch grid
    (prompt tokens of a method that keeps them), the last ``H/p * W/p`` tokens are the
    patches.

    On a hierarchical host the default ``layers`` are :func:`stage_end_layers`, giving
    ``(B, C_s, H/stride_s, W/stride_s)`` maps at strides 4/8/16/32; ``channels`` and
    ``strides`` say each map's width and stride.

    Args:
        model: A supported host (timm/transformers ViT, EVA, SAM, ResNet, ConvNeXt,
            Swin, Hiera ...), adapters or not.
        layers: Block indices (negative counts from the end); default
            :func:`default_layers` (:func:`stage_end_layers` on a hierarchical host).

    Example:
        >>> import timm, torch, vfm_adapters as va
        >>> vit = timm.create_model("vit_small_patch14_dinov2", depth=4, embed_dim=64,
        ...                         num_heads=2, img_size=56)
        >>> features = BackboneFeatures(va.inject_rein(vit))
        >>> [tuple(f.shape) for f in features(torch.randn(2, 3, 56, 56))]
        [(2, 64, 4, 4), (2, 64, 4, 4), (2, 64, 4, 4), (2, 64, 4, 4)]
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None) -> None:
        super().__init__()
        self.model = model
        self.host: HostSpec = describe_host(model)
        depth = self.host.depth
        if layers is None:
            layers = stage_end_layers(self.host) if self.host.hierarchical else default_layers(depth)
        self.layers = self.host.resolve_blocks([int(i) for i in layers], "feature layers")

    @property
    def embed_dim(self) -> int:
        return self.host.embed_dim

    @property
    def patch_size(self) -> int:
        return self.host.patch_size

    @property
    def channels(self) -> list[int]:
        """The width of each returned map."""
        widths = self.host.block_widths()
        return [widths[i] for i in self.layers]

    @property
    def strides(self) -> list[int]:
        """The stride (input pixels per map cell) of each returned map."""
        if self.host.stages is None:
            return [self.host.patch_size] * len(self.layers)
        strides = [stage.stride for stage in self.host.stages for _ in stage.block_names]
        return [strides[i] for i in self.layers]

    def _to_map(self, output, grid: tuple[int, int]) -> Tensor:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if self.host.layout == "NCHW":
            return hidden
        if self.host.layout == "BHWC" or hidden.ndim == 4:
            return hidden.permute(0, 3, 1, 2)
        height, width = grid
        _, patches = self.host.split_prefix(hidden)
        if patches.shape[1] != height * width:
            if patches.shape[1] < height * width:
                raise RuntimeError(
                    f"block output has {hidden.shape[1]} tokens; expected {self.host.num_prefix_tokens} prefix + "
                    f"{height}x{width} patch tokens for this image size"
                )
            patches = patches[:, -height * width :]
        return patches.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[2], height, width)

    def forward(self, images: Tensor) -> list[Tensor]:
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        blocks = self.host.blocks(self.model)
        captured: dict[int, Tensor] = {}
        handles = []

        def capture(index: int):
            def hook(module: nn.Module, args, output) -> None:
                captured[index] = self._to_map(output, grid)

            return hook

        try:
            for index in sorted(set(self.layers)):
                handles.append(blocks[index].register_forward_hook(capture(index)))
            _run_host(self.model, images)
        finally:
            for handle in handles:
                handle.remove()
        return [captured[index] for index in self.layers]


def check_stage_scales(features: BackboneFeatures, scales: Sequence[float]) -> None:
    """Refuses neck scales that would move a hierarchical host's maps off strides 4/8/16/32.

    Stage maps already have those strides; the ViT default ``(4, 2, 1, 0.5)`` would turn
    them into 1/4/16/64. Plain ViT hosts are not checked.

    Example:
        >>> import timm
        >>> with torch.device("meta"):
        ...     features = BackboneFeatures(timm.create_model("resnet50"))
        >>> check_stage_scales(features, (1, 1, 1, 1))
        >>> check_stage_scales(features, (4, 2, 1, 0.5))
        Traceback (most recent call last):
        ...
        ValueError: the stage maps of host family 'timm.ResNet' have strides [4, 8, 16, 32] already; neck scales [4.0, 2.0, 1.0, 0.5] would make them [1.0, 4.0, 16.0, 64.0]. Use scales [1, 1, 1, 1]
    """
    if not features.host.hierarchical:
        return
    strides = features.strides
    resulting = [stride / float(scale) for stride, scale in zip(strides, scales)]
    if strides == [4, 8, 16, 32] and resulting != [4.0, 8.0, 16.0, 32.0]:
        raise ValueError(
            f"the stage maps of host family {features.host.family!r} have strides {strides} already; neck scales "
            f"{[float(s) for s in scales]} would make them {resulting}. Use scales [1, 1, 1, 1]"
        )


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class MultiScaleNeck(nn.Module):
    """Learnable resampling of single-stride ViT maps by ``scales`` (default x4, x2, x1, x0.5).

    This library's own learnable neck (``model.neck: learnable``), not the Rein paper's:
    x4 is two 2x2 transposed convolutions with a norm and GELU between, x2 one
    transposed convolution, x1 the identity, x0.5 2x2 max pooling (about 12.6M
    parameters at width 1024). The paper's setups use :class:`InterpolationNeck`
    (DINOv2, EVA02, SAM) or :class:`MultiLevelNeck` (CLIP). With patch 16 this gives
    strides 4/8/16/32. Normalisation is GroupNorm, so results do not depend on the
    batch size or the number of GPUs.
    Scales ``(1, 1, 1, 1)`` pass a hierarchical host's stage maps through unchanged.

    Args:
        channels: Channels of every input map, or one value per map.
        scales: One factor per input map (4, 2, 1, 0.5 or any other, interpolated).

    Example:
        >>> neck = MultiScaleNeck(16)
        >>> [tuple(f.shape[-2:]) for f in neck([torch.randn(1, 16, 8, 8)] * 4)]
        [(32, 32), (16, 16), (8, 8), (4, 4)]
    """

    def __init__(self, channels: int | Sequence[int], scales: Sequence[float] = (4, 2, 1, 0.5)) -> None:
        super().__init__()
        self.scales = [float(s) for s in scales]
        widths = _widths(channels, len(self.scales), "MultiScaleNeck")
        self.out_channels = widths
        branches = []
        for channels, scale in zip(widths, self.scales):
            if scale == 4:
                branches.append(nn.Sequential(
                    nn.ConvTranspose2d(channels, channels, 2, stride=2), _norm(channels), nn.GELU(),
                    nn.ConvTranspose2d(channels, channels, 2, stride=2)))
            elif scale == 2:
                branches.append(nn.ConvTranspose2d(channels, channels, 2, stride=2))
            elif scale == 1:
                branches.append(nn.Identity())
            elif scale == 0.5:
                branches.append(nn.MaxPool2d(2))
            else:
                branches.append(nn.Identity())
        self.branches = nn.ModuleList(branches)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if len(features) != len(self.branches):
            raise ValueError(f"the neck expects {len(self.branches)} feature maps, got {len(features)}")
        out = []
        for feature, branch, scale in zip(features, self.branches, self.scales):
            if scale in (4, 2, 1, 0.5):
                out.append(branch(feature))
            else:
                size = (max(1, round(feature.shape[-2] * scale)), max(1, round(feature.shape[-1] * scale)))
                out.append(F.interpolate(feature, size=size, mode="bilinear", align_corners=False))
        return out


def _widths(channels: int | Sequence[int], count: int, neck: str) -> list[int]:
    """One width per input map from one shared width or a list (stage maps of a CNN differ)."""
    widths = [int(channels)] * count if isinstance(channels, int) else [int(c) for c in channels]
    if len(widths) != count:
        raise ValueError(f"{neck} got {len(widths)} channel counts for {count} scales")
    return widths


def _check_count(features: Sequence[Tensor], expected: int) -> None:
    if len(features) != expected:
        raise ValueError(f"the neck expects {expected} feature maps, got {len(features)}")


def _resize_by(feature: Tensor, scale: float) -> Tensor:
    if scale == 1:
        return feature
    return F.interpolate(feature, scale_factor=scale, mode="bilinear", align_corners=False)


class InterpolationNeck(nn.Module):
    """The Rein authors' parameter-free neck: bilinear resizing of each map by its scale.

    Their DINOv2/EVA02/SAM backbones return the block maps resized by x4, x2, x1, x0.5
    (``F.interpolate(scale_factor=s, mode="bilinear", align_corners=False)``), which at
    patch 16 gives strides 4/8/16/32 with nothing trained between backbone and head.

    Args:
        channels: Channels of every input map, or one value per map (passed through).
        scales: One factor per input map.

    Example:
        >>> neck = InterpolationNeck(16)
        >>> [tuple(f.shape[-2:]) for f in neck([torch.randn(1, 16, 8, 8)] * 4)], len(list(neck.parameters()))
        ([(32, 32), (16, 16), (8, 8), (4, 4)], 0)
    """

    def __init__(self, channels: int | Sequence[int], scales: Sequence[float] = (4, 2, 1, 0.5)) -> None:
        super().__init__()
        self.scales = [float(s) for s in scales]
        self.out_channels = _widths(channels, len(self.scales), "InterpolationNeck")
        if any(s <= 0 for s in self.scales):
            raise ValueError(f"neck scales must be positive, got {list(scales)}")

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        _check_count(features, len(self.scales))
        return [_resize_by(feature, scale) for feature, scale in zip(features, self.scales)]


class MultiLevelNeck(nn.Module):
    """An equivalent of mmseg's ``MultiLevelNeck`` (the Rein authors' CLIP-L setup).

    Per map: a 1x1 lateral convolution to ``out_channels``, bilinear resizing by its
    scale, then a 3x3 convolution; no norm, no activation, convolutions with bias and
    Xavier-uniform weights (mmseg's ``init_weights``).

    Args:
        channels: Channels of every input map, or one value per map.
        scales: One factor per input map.
        out_channels: Output channels of every map (default ``channels``, as in their
            CLIP-L config; required when the input widths differ).

    Example:
        >>> neck = MultiLevelNeck(8)
        >>> [tuple(f.shape[1:]) for f in neck([torch.randn(1, 8, 4, 4)] * 4)]
        [(8, 16, 16), (8, 8, 8), (8, 4, 4), (8, 2, 2)]
        >>> sum(p.numel() for p in neck.parameters()) == 4 * (8 * 8 + 8) + 4 * (8 * 8 * 9 + 8)
        True
    """

    def __init__(self, channels: int | Sequence[int], scales: Sequence[float] = (4, 2, 1, 0.5),
                 out_channels: int | None = None) -> None:
        super().__init__()
        self.scales = [float(s) for s in scales]
        widths = _widths(channels, len(self.scales), "MultiLevelNeck")
        if out_channels is None and len(set(widths)) > 1:
            raise ValueError(f"MultiLevelNeck: the input widths differ ({widths}); give out_channels")
        out_channels = int(widths[0] if out_channels is None else out_channels)
        self.out_channels = [out_channels] * len(self.scales)
        self.lateral_convs = nn.ModuleList(nn.Conv2d(width, out_channels, 1) for width in widths)
        self.convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in self.scales)
        for conv in [*self.lateral_convs, *self.convs]:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        _check_count(features, len(self.scales))
        return [conv(_resize_by(lateral(feature), scale))
                for feature, lateral, conv, scale in zip(features, self.lateral_convs, self.convs, self.scales)]


#: Neck names accepted by ``model.neck`` and :func:`build_neck`.
NECKS: dict[str, type[nn.Module]] = {
    "interpolate": InterpolationNeck,
    "multilevel": MultiLevelNeck,
    "learnable": MultiScaleNeck,
}


def build_neck(kind: str, channels: int | Sequence[int], scales: Sequence[float] = (4, 2, 1, 0.5)) -> nn.Module:
    """The neck called ``kind``: ``interpolate`` (the paper's, no parameters), ``multilevel``
    (mmseg's MultiLevelNeck, the paper's CLIP-L setup) or ``learnable`` (this library's).

    Example:
        >>> type(build_neck("interpolate", 16)).__name__
        'InterpolationNeck'
    """
    if kind not in NECKS:
        raise ValueError(f"unknown neck {kind!r}; choose one of {sorted(NECKS)}")
    return NECKS[kind](channels, scales)
