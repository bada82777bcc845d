"""DACS's mixing of a source and a target batch: teacher pseudo labels, their confidence
weight, ClassMix and the strong augmentation of the mixed images.

ClassMix ("ClassMix: Segmentation-Based Data Augmentation for Semi-Supervised Learning"),
as DACS ("DACS: Domain Adaptation via Cross-domain Mixed Sampling") uses it: half of the
source classes give a mask ``M``; ``x_m = M x_s + (1 - M) x_t``, ``y_m = M y_s + (1 - M) y_t``;
the pasted pixels have weight 1, the others the teacher's confidence weight.
:func:`vfm_adapters.adaptation.dacs.dacs_step` chains these pieces.

Example:
    >>> masks, chosen = class_mix_masks(torch.tensor([[[0, 1], [2, 3]]]), torch.Generator().manual_seed(0))
    >>> int(masks.sum()), len(chosen[0])
    (2, 2)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..seg.datasets import IGNORE_INDEX
from .augment import color_jitter, gaussian_blur

__all__ = ["class_mix", "class_mix_mask", "class_mix_masks", "confidence_weight", "pseudo_label",
           "pseudo_label_weights", "strong_augment"]


def pseudo_label(logits: Tensor, size: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Teacher pseudo labels: ``(argmax class, max softmax probability)``, each ``(B, H, W)``.

    Args:
        logits: Teacher logits ``(B, K, h, w)``.
        size: Output ``(H, W)``; logits are upsampled bilinearly first (default: as is).

    Example:
        >>> labels, confidence = pseudo_label(torch.tensor([[[[0.0]], [[2.0]]]]))
        >>> labels.tolist(), round(confidence.item(), 4)
        ([[[1]]], 0.8808)
    """
    logits = logits.detach().float()
    if size is not None and tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    confidence, labels = logits.softmax(dim=1).max(dim=1)
    return labels, confidence


def confidence_weight(max_probs: Tensor, threshold: float = 0.968, per: str = "batch") -> Tensor:
    """DACS's pseudo-label weight: the share of pixels with ``max prob >= threshold``.

    Args:
        max_probs: ``(B, H, W)`` maximum softmax probabilities.
        threshold: Confidence threshold (0.968).
        per: ``"batch"`` (one scalar for the batch, DACS/DAFormer) or ``"image"``.

    Returns:
        ``(B,)`` weights (all equal for ``per="batch"``).

    Example:
        >>> probs = torch.tensor([[[0.99, 0.5], [0.968, 0.2]], [[0.1, 0.1], [0.1, 0.97]]])
        >>> confidence_weight(probs).tolist()
        [0.375, 0.375]
        >>> confidence_weight(probs, per="image").tolist()
        [0.5, 0.25]
    """
    confident = (max_probs >= threshold).float()
    if per == "batch":
        return confident.mean().expand(max_probs.shape[0]).clone()
    if per == "image":
        return confident.flatten(1).mean(1)
    raise ValueError(f"per must be 'batch' or 'image', got {per!r}")


def pseudo_label_weights(confidence: Tensor, threshold: float = 0.968, per: str = "batch", ignore_top: int = 0,
                         ignore_bottom: int = 0) -> tuple[Tensor, Tensor]:
    """Per-pixel weights of pseudo labels: the :func:`confidence_weight` everywhere, 0 on the
    ``ignore_top`` first and ``ignore_bottom`` last rows (DAFormer on Cityscapes: 15 and 120,
    where the ego car and the sky make unreliable labels).

    Returns:
        ``(weights (B, H, W), confidence weight (B,))``.

    Example:
        >>> weights, weight = pseudo_label_weights(torch.tensor([[[0.99], [0.99], [0.5], [0.99]]]), ignore_top=1)
        >>> weights[0, :, 0].tolist(), weight.tolist()
        ([0.0, 0.75, 0.75, 0.75], [0.75])
    """
    weight = confidence_weight(confidence, threshold, per)
    weights = weight.view(-1, 1, 1).expand_as(confidence).clone()
    if ignore_top > 0:
        weights[:, :ignore_top] = 0
    if ignore_bottom > 0:
        weights[:, -ignore_bottom:] = 0
    return weights, weight


def class_mix_mask(
    label: Tensor, generator: torch.Generator | None = None, ignore_index: int = IGNORE_INDEX,
    classes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """ClassMix mask of one source label: pixels of half of the candidate classes.

    The candidates (by default the classes present in ``label``, ``ignore_index``
    excluded) are permuted at random and the first ``(n + n % 2) // 2`` kept, as DACS
    rounds (3 classes -> 2, 4 -> 2, 1 -> 1). :func:`class_mix_masks` passes the
    candidates of the whole batch, as the authors' code does.

    Args:
        label: ``(H, W)`` source label.
        generator: Source of randomness.
        ignore_index: Label value that is not a candidate when ``classes`` is ``None``.
        classes: Candidate classes (may hold values absent from ``label``, and ``ignore_index``).

    Returns:
        ``(mask, classes)``: a bool ``(H, W)`` mask and the chosen classes.

    Example:
        >>> mask, classes = class_mix_mask(torch.tensor([[0, 1], [2, 255]]), torch.Generator().manual_seed(0))
        >>> len(classes), int(mask.sum())
        (2, 2)
    """
    if classes is None:
        classes = torch.unique(label)
        classes = classes[classes != ignore_index]
    n = classes.numel()
    chosen = classes[torch.randperm(n, generator=generator)[: (n + n % 2) // 2].to(classes.device)]
    return torch.isin(label, chosen), chosen


def class_mix_masks(
    labels: Tensor, generator: torch.Generator | None = None, scope: str = "batch", ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, list[Tensor]]:
    """ClassMix masks of a batch of source labels ``(B, H, W)``.

    ``scope="batch"`` is what the DACS and DAFormer code do (``get_class_masks``): the
    candidates of EVERY image are ``torch.unique`` over the whole batch's labels, the
    ignore value included, so an image may draw classes it does not hold (they paste
    nothing) or the ignore value (its pixels are pasted with their ignored label).
    ``scope="image"`` is the papers' description: the classes of the image itself,
    ``ignore_index`` excluded.

    Returns:
        ``(masks (B, H, W) bool, chosen classes per image)``.

    Example:
        >>> labels = torch.tensor([[[0, 0], [1, 1]], [[2, 2], [255, 255]]])
        >>> masks, chosen = class_mix_masks(labels, torch.Generator().manual_seed(0))
        >>> [len(c) for c in chosen]   # 4 candidates {0, 1, 2, 255} -> 2 per image
        [2, 2]
        >>> [len(c) for c in class_mix_masks(labels, scope="image")[1]]   # {0, 1} -> 1, {2} -> 1
        [1, 1]
    """
    if scope not in ("batch", "image"):
        raise ValueError(f"class-mix scope must be 'batch' (the authors' code) or 'image', got {scope!r}")
    candidates = torch.unique(labels) if scope == "batch" else None
    pairs = [class_mix_mask(label, generator, ignore_index, candidates) for label in labels]
    return torch.stack([m for m, _ in pairs]), [c for _, c in pairs]


def class_mix(
    source_images: Tensor,
    target_images: Tensor,
    source_labels: Tensor,
    target_labels: Tensor,
    target_weights: Tensor,
    masks: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pastes the masked source pixels onto the target: image, label and weight.

    Args:
        source_images: ``(B, 3, H, W)``.
        target_images: ``(B, 3, H, W)``.
        source_labels: ``(B, H, W)``.
        target_labels: ``(B, H, W)`` pseudo labels.
        target_weights: ``(B, H, W)`` pseudo-label weights.
        masks: ``(B, H, W)`` bool, True where the source is pasted.

    Returns:
        Mixed images, labels and weights (1 on pasted pixels).

    Example:
        >>> m = torch.tensor([[[True, False]]])
        >>> img, lbl, w = class_mix(torch.ones(1, 3, 1, 2), torch.zeros(1, 3, 1, 2), torch.tensor([[[4, 5]]]),
        ...                         torch.tensor([[[7, 8]]]), torch.full((1, 1, 2), 0.3), m)
        >>> img[0, 0].tolist(), lbl.tolist(), w.tolist()
        ([[1.0, 0.0]], [[[4, 8]]], [[[1.0, 0.30000001192092896]]])
    """
    mask = masks.to(torch.bool)
    images = torch.where(mask[:, None], source_images, target_images)
    labels = torch.where(mask, source_labels, target_labels)
    weights = torch.where(mask, torch.ones_like(target_weights), target_weights)
    return images, labels, weights


def strong_augment(
    images: Tensor,
    generator: torch.Generator | None = None,
    jitter_strength: float = 0.2,
    jitter_p: float = 0.8,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.15, 1.15),
) -> Tensor:
    """DACS's augmentation of the mixed ``[0, 1]`` images: colour jitter, then blur.

    Example:
        >>> x = torch.rand(2, 3, 16, 16)
        >>> torch.equal(strong_augment(x, jitter_p=0.0, blur_p=0.0), x)
        True
    """
    images = color_jitter(images, jitter_strength, p=jitter_p, generator=generator)
    return gaussian_blur(images, p=blur_p, sigma=blur_sigma, generator=generator)
