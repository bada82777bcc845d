"""The one interface every segmentation model of this library offers: :class:`SegmentationModel`.

Training (``vfm-adapters train``), evaluation, DACS and self-training all talk to a model
through these members only, so a new head (or a model built outside this library) plugs
in by implementing them:

- ``forward(images)`` gives per-pixel class scores ``(B, K, H, W)`` at the image size;
  ``forward(images, labels)`` gives the training loss (so a ``DistributedDataParallel``
  wrapper sees the loss computed inside ``forward``).
- ``loss(images, labels, pixel_weights=None)`` is the model's own training objective:
  per-pixel cross-entropy for the light heads, matching + mask losses for Mask2Former.
  ``pixel_weights`` (DACS' confidence-weighted pseudo labels) is accepted only by models
  whose objective is per pixel (``per_pixel_loss``); the others refuse it with
  :class:`PixelWeightsUnsupported`, and DACS refuses them when its config loads.
- ``parameter_groups(lr, weight_decay, backbone_lr_mult)`` gives AdamW groups.
- ``mean``/``std`` (0-255 RGB) are the normalisation the model was built for, given at
  construction; ``num_classes``; ``decode_modules()`` (what is saved next to the adapters).

Implemented by :class:`~vfm_adapters.seg.heads.Segmentor` (light heads),
:class:`~vfm_adapters.seg.mask2former.Mask2FormerSegmentor` and
:class:`~vfm_adapters.adaptation.FeatureSegmentor`.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch.nn.functional as F
from torch import Tensor, nn

from .datasets import IGNORE_INDEX

__all__ = ["PixelWeightsUnsupported", "SegmentationModel", "model_loss", "segmentation_loss", "train_mode"]


class PixelWeightsUnsupported(ValueError):
    """A model whose training objective is not per pixel was given per-pixel loss weights."""


@runtime_checkable
class SegmentationModel(Protocol):
    """What train, eval, DACS and self-training need of a segmentation model (see the module docstring).

    Example:
        >>> import timm
        >>> from vfm_adapters.seg import Segmentor
        >>> vit = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32)
        >>> isinstance(Segmentor(vit, num_classes=3, head_channels=8), SegmentationModel)
        True
        >>> isinstance(nn.Conv2d(3, 3, 1), SegmentationModel)
        False
    """

    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: Whether :meth:`loss` is per pixel and so takes ``pixel_weights`` (DACS needs it).
    per_pixel_loss: bool

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """Scores ``(B, K, H, W)`` at the image size; the training loss when ``labels`` are given."""

    def loss(self, images: Tensor, labels: Tensor, pixel_weights: Tensor | None = None) -> Tensor:
        """The model's own training objective on normalised images and ``(B, H, W)`` labels."""

    def parameter_groups(self, lr: float, weight_decay: float, backbone_lr_mult: float = 0.1) -> list[dict]:
        """AdamW parameter groups of the trainable parameters."""

    def decode_modules(self) -> nn.ModuleDict:
        """The trained decode modules (saved next to the adapters)."""


def segmentation_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX,
                      pixel_weights: Tensor | None = None) -> Tensor:
    """Per-pixel cross-entropy at label resolution, ignoring ``ignore_index``.

    Logits are upsampled (bilinear) to the label size first. Without ``pixel_weights``
    it is the mean over the labelled pixels, and a batch whose pixels are all ignored
    gives a zero loss that still has a graph (no NaN). With ``(B, H, W)``
    ``pixel_weights`` it is DACS' ``mean over ALL pixels of w * CE`` (ignored pixels add 0).

    Example:
        >>> import torch
        >>> logits = torch.zeros(1, 3, 2, 2, requires_grad=True)
        >>> labels = torch.tensor([[[0, 1], [2, 255]]])
        >>> round(segmentation_loss(logits, labels).item(), 4)
        1.0986
        >>> round(segmentation_loss(logits, labels, pixel_weights=torch.ones(1, 2, 2)).item(), 4)  # 3/4 of it
        0.824
    """
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    if pixel_weights is not None:
        if tuple(pixel_weights.shape) != tuple(labels.shape):
            raise ValueError(f"pixel_weights {tuple(pixel_weights.shape)} must have the labels' shape {tuple(labels.shape)}")
        pixel = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
        return (pixel * pixel_weights).mean()
    if not bool((labels != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)


def model_loss(model: nn.Module, images: Tensor, labels: Tensor, pixel_weights: Tensor | None = None,
               ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The training loss of ``model`` on a batch: its own :meth:`SegmentationModel.loss` when it
    has one, else :func:`segmentation_loss` on its output (any ``images -> logits`` module).

    The models of this library ignore label 255; another ``ignore_index`` is accepted only
    for a plain module.

    Example:
        >>> import torch
        >>> conv = nn.Conv2d(3, 2, 1)
        >>> model_loss(conv, torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)).ndim
        0
    """
    if isinstance(model, SegmentationModel):
        if ignore_index != IGNORE_INDEX:
            raise ValueError(f"{type(model).__name__} ignores label {IGNORE_INDEX}; got ignore_index={ignore_index}")
        return model.loss(images, labels, pixel_weights)
    return segmentation_loss(model(images), labels, ignore_index, pixel_weights)


def check_normalisation(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` as float tuples of one value per RGB channel, refusing anything else.

    Example:
        >>> check_normalisation([123.675, 116.28, 103.53], (58.395, 57.12, 57.375))[0]
        (123.675, 116.28, 103.53)
    """
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std must be 3 values (RGB, 0-255 scale) with std > 0, got mean {mean}, std {std}")
    return mean, std


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, except that frozen batch norms stay in eval mode.

    A frozen CNN host (ResNet with Rein, as the Rein authors train it) must keep its
    batch-norm running statistics; in train mode they would follow each batch even though
    no parameter of the host trains. Batch norms with trainable parameters (full
    fine-tuning) train as usual.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).requires_grad_(False)
        >>> train_mode(net)[1].training, net[0].training
        (False, True)
    """
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
    return model
