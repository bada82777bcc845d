"""Light decode heads and the :class:`Segmentor` that joins host, adapters, neck and head.

The paper's head is Mask2Former; this library ships two light heads that train on a
CPU in minutes and are enough to compare adapters: a Semantic-FPN head (lateral 1x1
convolutions, a top-down pathway, 3x3 refinement, all levels summed at the finest
stride) and a linear head (all levels upsampled, concatenated, one 1x1 convolution).
Both are trained with per-pixel cross-entropy ignoring 255 (:func:`segmentation_loss`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._registry import Registry
from .config import METHOD_DEFAULTS
from .features import BackboneFeatures, build_neck, check_stage_scales
from .model import check_normalisation, segmentation_loss
from .optim import parameter_groups
from .transforms import IMAGENET_MEAN, IMAGENET_STD


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _conv(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
                         _norm(out_channels), nn.ReLU(inplace=True))


class FPNHead(nn.Module):
    """Semantic-FPN decode head over multi-scale maps (finest first).

    Args:
        in_channels: Channels of each input level.
        num_classes: Output classes.
        channels: Internal width.
        dropout: Dropout before the classifier.

    Example:
        >>> head = FPNHead([8, 8, 8, 8], num_classes=5, channels=16)
        >>> maps = [torch.randn(2, 8, s, s) for s in (16, 8, 4, 2)]
        >>> head(maps).shape
        torch.Size([2, 5, 16, 16])
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(_conv(c, channels, 1) for c in in_channels)
        self.refine = nn.ModuleList(_conv(channels, channels, 3) for _ in in_channels)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.num_classes = num_classes

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        laterals = [layer(f) for layer, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False)
        size = laterals[0].shape[-2:]
        fused = sum(F.interpolate(conv(x), size=size, mode="bilinear", align_corners=False) if x.shape[-2:] != size else conv(x)
                    for conv, x in zip(self.refine, laterals))
        return self.classifier(self.dropout(fused))


class LinearHead(nn.Module):
    """All levels upsampled to the finest, concatenated, normalised, one 1x1 convolution.

    Example:
        >>> head = LinearHead([8, 8], num_classes=3)
        >>> head([torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)]).shape
        torch.Size([1, 3, 8, 8])
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 0, dropout: float = 0.1) -> None:
        super().__init__()
        total = sum(in_channels)
        self.norm = _norm(total)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(total, num_classes, 1)
        self.num_classes = num_classes

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        stacked = torch.cat([f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                             for f in features], dim=1)
        return self.classifier(self.dropout(self.norm(stacked)))


# Head classes by config name; assigning a taken name raises (use HEADS.register(..., replace=True)).
HEADS: Registry[type[nn.Module]] = Registry("segmentation head", {"fpn": FPNHead, "linear": LinearHead})


class Segmentor(nn.Module):
    """Host ViT (with adapters) -> block features -> neck -> head -> per-pixel logits.

    Args:
        backbone: The host model, adapters already injected (or injected later: the
            feature hooks are registered per call and always run after adapters').
        num_classes: Output classes.
        layers: Feature blocks; default :func:`~vfm_adapters.seg.features.default_layers`.
        head: ``"fpn"`` or ``"linear"``.
        head_channels: Width of the FPN head.
        scales: Neck resampling factors, one per feature layer.
        dropout: Dropout before the classifier.
        neck: ``"learnable"`` (default), ``"interpolate"`` (the paper's, parameter-free)
            or ``"multilevel"``; see :func:`~vfm_adapters.seg.features.build_neck`.
        mean: Per-channel mean (0-255 RGB) of the images this model expects.
        std: Per-channel standard deviation, as ``mean``.

    Example:
        >>> import timm, vfm_adapters as va
        >>> vit = va.inject_rein(timm.create_model("vit_small_patch14_dinov2", depth=4, embed_dim=32,
        ...                                        num_heads=2, img_size=56))
        >>> seg = Segmentor(vit, num_classes=5, head_channels=16)
        >>> seg(torch.randn(1, 3, 56, 56)).shape
        torch.Size([1, 5, 56, 56])
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        layers: Sequence[int] | None = None,
        head: str = "fpn",
        head_channels: int = 128,
        scales: Sequence[float] = (4, 2, 1, 0.5),
        dropout: float = 0.1,
        neck: str = "learnable",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; available: {sorted(HEADS)}")
        self.features = BackboneFeatures(backbone, layers)
        if len(scales) != len(self.features.layers):
            raise ValueError(f"{len(self.features.layers)} feature layers need {len(self.features.layers)} neck scales, got {list(scales)}")
        check_stage_scales(self.features, scales)
        channels = self.features.channels  # one width per map (stages of a hierarchical host differ)
        self.neck = build_neck(neck, channels, scales)
        self.head = HEADS[head](self.neck.out_channels, num_classes, head_channels, dropout)
        self.num_classes = num_classes
        self.mean, self.std = check_normalisation(mean, std)
        self.settings = {"num_classes": num_classes, "layers": list(self.features.layers), "head": head,
                         "head_channels": head_channels, "scales": [float(s) for s in scales], "dropout": dropout, "neck": neck}

    @property
    def backbone(self) -> nn.Module:
        """The host model (registered once, under ``features.model``)."""
        return self.features.model

    def decode_modules(self) -> nn.ModuleDict:
        """The neck and head: the trained parts saved next to the adapters."""
        return nn.ModuleDict({"neck": self.neck, "head": self.head})

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits ``(B, K, H, W)`` at the image size or, given ``labels``, the training loss."""
        if labels is not None:
            return self.loss(images, labels)
        maps = self.neck(self.features(images))
        logits = self.head(maps)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def loss(self, images: Tensor, labels: Tensor, pixel_weights: Tensor | None = None) -> Tensor:
        """Per-pixel cross-entropy (255 ignored; weighted by ``pixel_weights`` if given)."""
        return segmentation_loss(self(images), labels, pixel_weights=pixel_weights)

    def parameter_groups(self, lr: float, weight_decay: float, backbone_lr_mult: float = 0.1,
                         no_decay: str = "authors") -> list[dict]:
        """AdamW groups (:func:`vfm_adapters.seg.optim.parameter_groups`): the host's own weights at
        ``lr * backbone_lr_mult``, no decay on what the Rein authors exempt."""
        return parameter_groups(self, lr, weight_decay, backbone_lr_mult, no_decay)

    #: Light heads are trained by per-pixel cross-entropy (so DACS can weight it).
    per_pixel_loss = True

    #: Method options used with these heads unless a config says otherwise: no query link
    #: (a light head has no object queries; the link would be parameters without gradients).
    method_defaults: Mapping[str, Mapping[str, Any]] = METHOD_DEFAULTS

    @classmethod
    def from_config(cls, backbone: nn.Module, model_config: Mapping[str, Any]) -> "Segmentor":
        """The segmentor of a training config's ``model`` section around an adapted ``backbone``."""
        return cls(backbone, int(model_config["num_classes"]), layers=model_config.get("layers"),
                   head=model_config["head"], head_channels=int(model_config["head_channels"]),
                   scales=model_config["scales"], dropout=float(model_config["dropout"]),
                   neck=model_config.get("neck") or "learnable", mean=model_config["mean"], std=model_config["std"])

    @classmethod
    def from_settings(cls, backbone: nn.Module, settings: Mapping[str, Any], **options: Any) -> "Segmentor":
        """Rebuilds a segmentor from its ``settings`` (as saved in ``segmentor.json``); ``options``
        (``mean``, ``std``) are passed on.

        Example:
            >>> import timm
            >>> vit = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32)
            >>> seg = Segmentor(vit, num_classes=3, head_channels=8)
            >>> Segmentor.from_settings(vit, seg.settings).load_state_dict(seg.state_dict())
            <All keys matched successfully>
        """
        s = settings
        return cls(backbone, s["num_classes"], layers=s["layers"], head=s["head"], head_channels=s["head_channels"],
                   scales=s["scales"], dropout=s["dropout"], neck=s.get("neck", "learnable"), **options)

    @staticmethod
    def build_head(name: str, in_channels: Sequence[int], model_config: Mapping[str, Any]) -> nn.Module:
        """The light head ``name`` over feature maps of ``in_channels`` (a features-only encoder's)."""
        return HEADS[name](in_channels, int(model_config["num_classes"]), int(model_config["head_channels"]),
                           float(model_config["dropout"]))
