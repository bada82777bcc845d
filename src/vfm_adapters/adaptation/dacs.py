"""DACS (Tranheden et al., WACV 2021) with DAFormer's options, for any segmentor.

A *segmentor* here is any ``nn.Module`` mapping normalised images ``(B, 3, H, W)`` to
logits ``(B, K, H, W)`` (or ``(B, K, h, w)``, upsampled bilinearly to the label size):
:class:`vfm_adapters.seg.Segmentor` with an EVA02-CLIP or a DINOv2 + Rein backbone, or
anything else.

One step (:func:`dacs_step`, :class:`DACSTrainer`), for a source batch ``(x_s, y_s)``
and a target batch ``x_t`` (DACS, Tranheden et al., WACV 2021; DAFormer, Hoyer et al., CVPR 2022):

1. Source loss ``L_s = CE(f(x_s), y_s)`` (255 ignored).
2. The mean teacher ``g`` labels the target: ``p = softmax(g(x_t))``,
   ``y_t = argmax_c p``; the confidence weight is the share of pixels whose
   ``max_c p >= 0.968`` -- one scalar for the whole batch (as in the DACS
   and DAFormer code; ``weight_mode="image"`` gives one scalar per image).
3. ClassMix: for each pair ``i``, half of the candidate classes (the batch's unique
   source label values, see :func:`class_mix_masks`; DACS's rounding: ``n`` candidates
   -> ``(n + n % 2) // 2`` chosen by a random permutation) give a mask ``M``;
   ``x_m = M x_s + (1 - M) x_t``, ``y_m = M y_s + (1 - M) y_t``, weight
   ``w_m = M + (1 - M) w``.
4. Strong augmentation of ``x_m``: colour jitter (0.2 each, p = 0.8) and Gaussian blur
   (p = 0.5, sigma 0.15-1.15).
5. Target loss ``L_t = mean over all pixels of w_m * CE(f(x_m), y_m)``; the student
   takes a step on ``L_s + L_t``.
6. The teacher follows: ``g <- a_t g + (1 - a_t) f``, ``a_t = min(1 - 1/(t + 1), 0.99)``
   (after the step; DAFormer: at the start of step ``t > 0``, ``ema_timing="before"``).

DAFormer's additions are options: ``ema_alpha=0.999`` with the teacher updated at the
START of step ``t > 0`` (``ema_timing="before"``), a linear learning-rate warm-up
(:func:`warmup_poly_lambda`, 1500 iterations), rare-class sampling of source images
(:class:`RareClassSampler`, temperature 0.01, with :class:`RareClassCrops` re-drawing
the crop until it holds the class), ignoring the top/bottom rows of the pseudo label
(``ignore_top``/``ignore_bottom``, DAFormer uses 15/120 on Cityscapes) and the ImageNet
feature distance on thing classes (``fdist_lambda=0.005``, :func:`feature_distance_loss`;
off by default: the vision-language-model study finds it conflicts with CLIP encoders).
ClassMix draws from ``torch.unique`` over the whole batch's source labels, the ignore
value included, as both official codes do (``class_mix_scope="batch"``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler

from ..seg.datasets import IGNORE_INDEX
from ..seg.model import model_loss, train_mode
from ..seg.transforms import IMAGENET_MEAN, IMAGENET_STD
from .augment import color_jitter, denormalize, gaussian_blur, normalize
from .ema import ema_alpha, ema_update, make_teacher

__all__ = [
    "DACSConfig",
    "DACSTrainer",
    "RareClassSampler",
    "class_mix",
    "class_mix_mask",
    "class_mix_masks",
    "RareClassCrops",
    "RareClassPositions",
    "class_pixel_counts",
    "confidence_weight",
    "downscale_label_ratio",
    "feature_distance_loss",
    "dacs_step",
    "pseudo_label",
    "rare_class_probabilities",
    "strong_augment",
    "warmup_poly_lambda",
]


# ----------------------------------------------------------------------------- pieces
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


#: DAFormer's ``imnet_feature_dist_classes`` (Cityscapes train ids of traffic light, traffic
#: sign, person, rider, car, truck, bus, train, motorcycle, bicycle).
CITYSCAPES_THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


def downscale_label_ratio(labels: Tensor, scale_factor: int, min_ratio: float, num_classes: int,
                          ignore_index: int = IGNORE_INDEX) -> Tensor:
    """DAFormer's label downscaling: the majority class of each ``scale_factor`` block,
    ``ignore_index`` where it covers less than ``min_ratio`` of the block (or is ignored).

    Example:
        >>> lbl = torch.tensor([[[1, 1, 2, 2], [1, 1, 2, 255], [0, 0, 3, 3], [0, 3, 3, 3]]])
        >>> downscale_label_ratio(lbl, 2, 0.75, 4).tolist()
        [[[1, 2], [0, 3]]]
        >>> downscale_label_ratio(lbl, 2, 1.0, 4).tolist()
        [[[1, 255], [255, 3]]]
    """
    if scale_factor < 1:
        raise ValueError(f"scale_factor must be at least 1, got {scale_factor}")
    labels = labels.clone().long()
    labels[(labels == ignore_index) | (labels < 0) | (labels >= num_classes)] = num_classes
    onehot = F.one_hot(labels, num_classes + 1).permute(0, 3, 1, 2).float()
    ratio, out = F.avg_pool2d(onehot, kernel_size=scale_factor).max(dim=1)
    out[out == num_classes] = ignore_index
    out[ratio < min_ratio] = ignore_index
    return out


def feature_distance_loss(features: Tensor, imagenet_features: Tensor, labels: Tensor | None = None,
                          classes: Sequence[int] | None = CITYSCAPES_THING_CLASSES, min_ratio: float = 0.75,
                          num_classes: int = 19, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """DAFormer's ImageNet feature distance: mean L2 distance of the student's and the
    frozen initial encoder's features, over feature pixels of ``classes`` (thing classes).

    The labels are downscaled to the feature grid by :func:`downscale_label_ratio` (a
    pixel counts when one class covers >= ``min_ratio`` of its block). With no such pixel
    the loss is 0 (DAFormer's mean over nothing would be NaN).

    Example:
        >>> f, g = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2); f[0, 0, 0, 0] = 3.0; f[0, 1, 0, 0] = 4.0
        >>> feature_distance_loss(f, g, torch.full((1, 4, 4), 6)).item()      # all "light": mean of 5, 0, 0, 0
        1.25
        >>> feature_distance_loss(f, g, torch.zeros(1, 4, 4, dtype=torch.long)).item()   # no thing pixel
        0.0
    """
    distance = torch.norm(features.float() - imagenet_features.float().detach(), dim=1, p=2)  # (B, h, w)
    if classes is not None and labels is not None:
        scale = labels.shape[-1] // features.shape[-1]
        small = downscale_label_ratio(labels, max(scale, 1), min_ratio, num_classes, ignore_index)
        if tuple(small.shape[-2:]) != tuple(distance.shape[-2:]):
            small = F.interpolate(small[:, None].float(), size=distance.shape[-2:], mode="nearest")[:, 0].long()
        mask = torch.isin(small, torch.as_tensor(list(classes), device=small.device))
        if not bool(mask.any()):
            return distance.sum() * 0.0
        return distance[mask].mean()
    return distance.mean()


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


def warmup_poly_lambda(total: int, warmup_iters: int = 1500, warmup_ratio: float = 1e-6, power: float = 1.0):
    """DAFormer's schedule as a ``LambdaLR`` factor: linear warm-up, then ``(1 - t/T) ** power``.

    Example:
        >>> f = warmup_poly_lambda(100, warmup_iters=10)
        >>> round(f(0), 6), round(f(5), 3), f(10), f(100)
        (1e-06, 0.475, 0.9, 0.0)
    """
    from ..seg.optim import poly_factor

    return lambda step: poly_factor(step, total, power, warmup_iters, warmup_ratio)


# ----------------------------------------------------------------------------- rare-class sampling
def _label_only(dataset: Any, index: int) -> Tensor:
    samples = getattr(dataset, "samples", None)
    if samples is not None and hasattr(dataset, "convert_label") and hasattr(dataset, "label_table"):
        from ..seg.datasets import read_label

        stored = read_label(samples[index][1], getattr(dataset, "label_channel", None))
        return torch.from_numpy(np.asarray(dataset.convert_label(stored, dataset.label_table(index))))
    item = dataset.load(index) if hasattr(dataset, "load") else dataset[index]
    return item["label"]


def class_pixel_counts(
    dataset: Any, num_classes: int, cache: str | os.PathLike | None = None, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Pixels of every class in every image: an ``(N, K)`` int64 array (DAFormer's class stats).

    Reads only label files when the dataset is a :class:`vfm_adapters.seg.SegmentationDataset`.
    With ``cache`` the counts are stored as JSON and read back on the next call.

    Example:
        >>> data = [{"label": torch.tensor([[0, 0], [1, 255]])}, {"label": torch.tensor([[2, 2], [2, 2]])}]
        >>> class_pixel_counts(data, 3).tolist()
        [[2, 1, 0], [0, 0, 4]]
    """
    if cache is not None and Path(cache).is_file():
        counts = np.asarray(json.loads(Path(cache).read_text())["counts"], dtype=np.int64)
        if counts.shape == (len(dataset), num_classes):
            return counts
    counts = np.zeros((len(dataset), num_classes), dtype=np.int64)
    for index in range(len(dataset)):
        label = _label_only(dataset, index).flatten()
        label = label[(label != ignore_index) & (label >= 0) & (label < num_classes)]
        counts[index] = torch.bincount(label.long(), minlength=num_classes).numpy()
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        Path(cache).write_text(json.dumps({"counts": counts.tolist()}))
    return counts


def rare_class_probabilities(counts: np.ndarray, temperature: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """DAFormer's rare-class sampling distribution over the classes present.

    ``f_c`` = pixels of ``c`` / all labelled pixels; ``P(c) = softmax((1 - f_c) / T)``.
    Classes that never occur are left out.

    Returns:
        ``(classes, probabilities)``.

    Example:
        >>> classes, p = rare_class_probabilities(np.array([[90, 10, 0]]), temperature=0.1)
        >>> classes.tolist(), [round(float(v), 4) for v in p]
        ([0, 1], [0.0003, 0.9997])
    """
    totals = np.asarray(counts).sum(0).astype(np.float64)
    classes = np.nonzero(totals > 0)[0]
    freq = totals[classes] / totals[classes].sum()
    logits = (1.0 - freq) / temperature
    logits -= logits.max()
    prob = np.exp(logits)
    return classes, prob / prob.sum()


class RareClassSampler(Sampler):
    """Source indices drawn by rare-class sampling: a class by :func:`rare_class_probabilities`,
    then uniformly an image holding more than ``min_pixels`` of it (DAFormer: 3000).

    Classes with no such image are dropped from the distribution (renormalised).
    DAFormer also re-draws the crop until it holds more than ``min_pixels x min_crop_ratio``
    pixels of the class: :meth:`draws` gives the sampled class beside each index, and
    :class:`RareClassCrops` does the re-drawing.

    Args:
        counts: ``(N, K)`` class pixel counts (:func:`class_pixel_counts`).
        temperature: Softmax temperature (0.01).
        min_pixels: Pixels of the class an image needs to be drawn for it.
        length: Number of indices per iteration over the sampler.
        seed: Seed.

    Example:
        >>> counts = np.array([[5000, 0], [5000, 0], [5000, 4000]])
        >>> s = RareClassSampler(counts, min_pixels=3000, length=20, seed=0)
        >>> sorted(set(s)), round(float(s.probabilities[1]), 3)  # the rare class 1 is only in image 2
        ([2], 1.0)
    """

    def __init__(self, counts: np.ndarray, temperature: float = 0.01, min_pixels: int = 3000,
                 length: int = 1000, seed: int = 0) -> None:
        counts = np.asarray(counts)
        classes, prob = rare_class_probabilities(counts, temperature)
        self.images = {int(c): np.nonzero(counts[:, c] > min_pixels)[0] for c in classes}
        keep = np.array([len(self.images[int(c)]) > 0 for c in classes], dtype=bool)
        if not keep.any():
            raise ValueError(f"no image holds more than {min_pixels} pixels of any class; lower min_pixels")
        self.classes, prob = classes[keep], prob[keep]
        self.probabilities = prob / prob.sum()
        self.length, self.seed, self.epoch = int(length), int(seed), 0

    def draws(self, skip: int = 0) -> Iterator[tuple[int, int]]:
        """``(image index, sampled class)`` pairs of one pass (what ``__iter__`` yields, plus the class).

        ``skip`` draws are made and dropped first (a resumed run continues the same sequence).
        """
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        for _ in range(skip):
            rng.choice(self.images[int(rng.choice(self.classes, p=self.probabilities))])
        for _ in range(self.length):
            c = int(rng.choice(self.classes, p=self.probabilities))
            yield int(rng.choice(self.images[c])), c

    def __iter__(self) -> Iterator[int]:
        for index, _ in self.draws():
            yield index

    def __len__(self) -> int:
        return self.length


class RareClassCrops(Dataset):
    """DAFormer's rare-class crops: a source sample transformed until its crop holds the class.

    Indexed by ``(position, index, class)`` (from :meth:`RareClassSampler.draws` and a
    stream position). The sample ``index`` is transformed with a generator seeded by
    ``(seed, position)``; while the crop holds at most ``min_pixels * min_crop_ratio``
    pixels of ``class`` (DAFormer: 3000 x 0.5), the same image is transformed again (its
    random rescale, crop and flip redrawn) with a generator seeded by
    ``(seed, position, attempt)``, up to ``max_redraws`` (10) times, as DAFormer's
    ``UDADataset.get_rare_class_sample`` does. The last draw is kept even if it misses.

    Args:
        dataset: The source dataset (with ``load(index)`` or ``__getitem__``).
        transform: ``transform(sample, rng=...)`` giving a labelled crop.
        seed: Seed of the augmentation.
        min_pixels: RCS's ``min_pixels`` (3000).
        min_crop_ratio: RCS's ``min_crop_ratio`` (0.5); 0 disables the re-drawing.
        max_redraws: Re-draws at most (10).

    Example:
        >>> from vfm_adapters.seg.transforms import RandomCrop
        >>> label = torch.zeros(8, 8, dtype=torch.long); label[:, 6:] = 1
        >>> data = [{"image": torch.zeros(3, 8, 8), "label": label}]
        >>> crops = RareClassCrops(data, RandomCrop((4, 4)), min_pixels=4, min_crop_ratio=1.0)
        >>> int((crops[(0, 0, 1)]["label"] == 1).sum()) > 4
        True
    """

    def __init__(self, dataset: Any, transform: Any, seed: int = 0, min_pixels: int = 3000,
                 min_crop_ratio: float = 0.5, max_redraws: int = 10) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, int(seed)
        self.threshold = float(min_pixels) * float(min_crop_ratio)
        self.min_crop_ratio, self.max_redraws = float(min_crop_ratio), int(max_redraws)
        self.attempts: list[int] = []  # re-draws of the last call (for inspection)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        position, index, cls = (int(k) for k in key)
        raw = self.dataset.load(index) if hasattr(self.dataset, "load") else self.dataset[index]
        sample = self.transform(dict(raw), rng=np.random.default_rng([self.seed, position]))
        redraws = 0
        if self.min_crop_ratio > 0:
            while int((sample["label"] == cls).sum()) <= self.threshold and redraws < self.max_redraws:
                redraws += 1
                sample = self.transform(dict(raw), rng=np.random.default_rng([self.seed, position, redraws]))
        self.attempts = [redraws]
        sample["source"] = 0
        return sample


class RareClassPositions(Sampler):
    """``(position, index, class)`` keys for :class:`RareClassCrops` from a :class:`RareClassSampler`.

    ``start`` is the first stream position; the sampler's first ``start`` draws are
    skipped, so a resumed run draws what an uninterrupted one would.

    Example:
        >>> keys = list(RareClassPositions(RareClassSampler(np.array([[5000, 4000]]), length=2), start=3))
        >>> [k[:2] for k in keys]
        [(3, 0), (4, 0)]
        >>> full = list(RareClassPositions(RareClassSampler(np.array([[5000, 4000], [0, 9000]]), length=6)))
        >>> full[2:] == list(RareClassPositions(RareClassSampler(np.array([[5000, 4000], [0, 9000]]), length=4), start=2))
        True
    """

    def __init__(self, sampler: RareClassSampler, start: int = 0) -> None:
        self.sampler, self.start = sampler, int(start)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for k, (index, cls) in enumerate(self.sampler.draws(skip=self.start)):
            yield self.start + k, index, cls

    def __len__(self) -> int:
        return len(self.sampler)


# ----------------------------------------------------------------------------- the step
@dataclass
class DACSConfig:
    """Options of a DACS step; defaults are DACS's, see :meth:`daformer` for DAFormer's.

    Attributes:
        threshold: Pseudo-label confidence threshold (0.968).
        weight_mode: ``"batch"`` (one confidence weight per batch) or ``"image"``.
        ema_alpha: Cap of the teacher's EMA coefficient (DACS 0.99, DAFormer 0.999).
        ema_ramp: ``alpha_t = min(1 - 1/(t+1), ema_alpha)`` (both papers' code); False = fixed alpha.
        ema_timing: ``"after"`` (DACS: after step ``t``'s optimiser step, with ``alpha_t``) or
            ``"before"`` (DAFormer: at the start of step ``t > 0``, before the pseudo labels,
            with ``alpha_t``; the teacher of step 0 is the initial student).
        class_mix_scope: ``"batch"`` (both official codes: half of ``torch.unique`` over the
            whole batch's source labels, the ignore value included) or ``"image"`` (the
            papers' text: half of the image's own classes); see :func:`class_mix_masks`.
        jitter_strength: Colour jitter range (0.2 for brightness, contrast, saturation, hue).
        jitter_p: Probability of jittering a mixed batch (0.8).
        blur_p: Probability of blurring a mixed batch (0.5).
        blur_sigma: Blur sigma range (0.15, 1.15).
        ignore_top: Rows at the top of the pseudo label with weight 0 (DAFormer on Cityscapes: 15).
        ignore_bottom: Rows at the bottom with weight 0 (DAFormer on Cityscapes: 120).
        mean: Normalisation mean on the 0..255 scale (to undo/redo it around augmentation).
        std: Normalisation std on the 0..255 scale.
        fdist_lambda: Weight of DAFormer's ImageNet feature distance on the source batch
            (0 = off, DACS; DAFormer 0.005). Needs the frozen initial encoder
            (:class:`DACSTrainer` makes it).
        fdist_classes: Classes whose feature pixels count (DAFormer: Cityscapes things,
            :data:`CITYSCAPES_THING_CLASSES`); ``None`` = every pixel.
        fdist_scale_min_ratio: ``min_ratio`` of :func:`downscale_label_ratio` (0.75).
        fdist_module: Name of the student's submodule whose output (its last map if a
            list) is the encoder feature (``"features"`` for a ``seg.Segmentor``).
        ignore_index: Ignored label.
        seed: Seed of the step's generator (ClassMix, augmentation).
    """

    threshold: float = 0.968
    weight_mode: str = "batch"
    ema_alpha: float = 0.99
    ema_ramp: bool = True
    ema_timing: str = "after"
    class_mix_scope: str = "batch"
    jitter_strength: float = 0.2
    jitter_p: float = 0.8
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.15, 1.15)
    ignore_top: int = 0
    ignore_bottom: int = 0
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)
    fdist_lambda: float = 0.0
    fdist_classes: tuple[int, ...] | None = CITYSCAPES_THING_CLASSES
    fdist_scale_min_ratio: float = 0.75
    fdist_module: str = "features"
    ignore_index: int = IGNORE_INDEX
    seed: int = 0

    def __post_init__(self) -> None:
        if self.fdist_classes is not None:
            self.fdist_classes = tuple(int(c) for c in self.fdist_classes)
        if self.fdist_lambda < 0:
            raise ValueError(f"fdist_lambda must be >= 0, got {self.fdist_lambda}")
        if self.weight_mode not in ("batch", "image"):
            raise ValueError(f"weight_mode must be 'batch' or 'image', got {self.weight_mode!r}")
        if not 0.0 <= self.ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in [0, 1], got {self.ema_alpha}")
        if self.ema_timing not in ("after", "before"):
            raise ValueError(f"ema_timing must be 'after' (DACS) or 'before' (DAFormer), got {self.ema_timing!r}")
        if self.class_mix_scope not in ("batch", "image"):
            raise ValueError(f"class_mix_scope must be 'batch' or 'image', got {self.class_mix_scope!r}")
        self.blur_sigma = tuple(float(s) for s in self.blur_sigma)
        self.mean, self.std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)

    @classmethod
    def daformer(cls, **overrides: Any) -> "DACSConfig":
        """DAFormer's settings: EMA 0.999 updated at the start of a step, the Cityscapes
        top/bottom pseudo-label crop.

        Example:
            >>> DACSConfig.daformer().ema_alpha, DACSConfig.daformer(ignore_bottom=0).ignore_top
            (0.999, 15)
            >>> DACSConfig.daformer().ema_timing, DACSConfig().ema_timing
            ('before', 'after')
        """
        return cls(**{"ema_alpha": 0.999, "ema_timing": "before", "ignore_top": 15, "ignore_bottom": 120,
                      **overrides})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DACSConfig":
        """Builds a config from a mapping, refusing unknown keys."""
        accepted = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - accepted)
        if unknown:
            raise ValueError(f"unknown DACS option(s) {unknown}; accepted: {sorted(accepted)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _num_classes(student: nn.Module, labels: Tensor, ignore_index: int) -> int:
    """The student's class count (a plain ``images -> logits`` module has none: the labels bound it)."""
    count = getattr(student, "num_classes", None)
    if count is not None:
        return int(count)
    valid = labels[labels != ignore_index]
    return int(valid.max()) + 1 if valid.numel() else 1


def dacs_step(
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    source_images: Tensor,
    source_labels: Tensor,
    target_images: Tensor,
    step: int,
    config: DACSConfig | None = None,
    generator: torch.Generator | None = None,
    scheduler: Any | None = None,
    update_teacher: bool = True,
    imagenet_encoder: nn.Module | None = None,
) -> dict[str, Any]:
    """One DACS training step: source CE + weighted CE on the ClassMixed batch, then EMA.

    Args:
        student: The segmentor being trained (normalised images -> logits).
        teacher: Its mean teacher (:func:`vfm_adapters.adaptation.ema.make_teacher`).
        optimizer: Optimiser of the student's trainable parameters.
        source_images: Normalised ``(B, 3, H, W)`` source images.
        source_labels: ``(B, H, W)`` source labels (255 ignored).
        target_images: Normalised ``(B', 3, H, W)`` target images (pair ``i`` uses
            target ``i % B'``).
        step: 0-based index of this step (sets the EMA coefficient and, with
            ``ema_timing="before"``, whether the teacher is updated first).
        config: Options (default :class:`DACSConfig`).
        generator: Randomness of ClassMix and the augmentation.
        scheduler: Stepped after the optimiser if given.
        update_teacher: Apply the EMA update (after the step, or before it with ``ema_timing="before"``).
        imagenet_encoder: The frozen initial ``config.fdist_module`` (needed when
            ``config.fdist_lambda > 0``).

    Returns:
        ``{"loss", "loss_source", "loss_target", "pseudo_weight", "alpha", "mixed_images",
        "mixed_labels", "mixed_weights", "masks"}`` (losses as floats, the rest detached).

    Example:
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> student = nn.Conv2d(3, 4, 1)
        >>> teacher = make_teacher(student)
        >>> opt = torch.optim.SGD(student.parameters(), lr=0.1)
        >>> out = dacs_step(student, teacher, opt, torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2, 8, 8)),
        ...                 torch.randn(2, 3, 8, 8), step=0, generator=torch.Generator().manual_seed(0))
        >>> sorted(k for k in out if k.startswith("loss")), out["alpha"]
        (['loss', 'loss_source', 'loss_target'], 0.0)
    """
    config = config or DACSConfig()
    size = source_labels.shape[-2:]
    if tuple(source_images.shape[-2:]) != tuple(size) or tuple(target_images.shape[-2:]) != tuple(size):
        raise ValueError(f"source images {tuple(source_images.shape[-2:])}, labels {tuple(size)} and target images "
                         f"{tuple(target_images.shape[-2:])} must have the same size (crop both to one size)")
    batch = source_images.shape[0]
    target_images = target_images[torch.arange(batch, device=target_images.device) % target_images.shape[0]]

    alpha = ema_alpha(step, config.ema_alpha, config.ema_ramp)
    if config.ema_timing == "before":  # DAFormer: the teacher follows at the start of step t > 0
        if step == 0:
            alpha = 0.0  # step 0: the teacher is (re)set to the initial student (DAFormer's _init_ema_weights)
        if update_teacher:
            ema_update(teacher, student, alpha)

    train_mode(student)  # frozen batch norms (a frozen CNN host) keep their statistics
    captured: list[Any] = []
    hook = None
    if config.fdist_lambda > 0:
        if imagenet_encoder is None:
            raise ValueError("fdist_lambda > 0 needs imagenet_encoder, the frozen initial "
                             f"{config.fdist_module!r} module (DACSTrainer makes it)")
        hook = student.get_submodule(config.fdist_module).register_forward_hook(
            lambda module, args, output: captured.append(output))
    try:
        loss_source = model_loss(student, source_images, source_labels, ignore_index=config.ignore_index)
    finally:
        if hook is not None:
            hook.remove()
    loss_fdist = None
    if config.fdist_lambda > 0:
        last = lambda out: out[-1] if isinstance(out, (list, tuple)) else out  # noqa: E731
        with torch.no_grad():
            imagenet_encoder.eval()
            reference = last(imagenet_encoder(source_images))
        loss_fdist = config.fdist_lambda * feature_distance_loss(
            last(captured[0]), reference, source_labels, config.fdist_classes, config.fdist_scale_min_ratio,
            _num_classes(student, source_labels, config.ignore_index), config.ignore_index)

    with torch.no_grad():
        teacher.eval()
        labels_t, confidence = pseudo_label(teacher(target_images), size)
        weight = confidence_weight(confidence, config.threshold, config.weight_mode)
        weights_t = weight.view(-1, 1, 1).expand_as(confidence).clone()
        if config.ignore_top > 0:
            weights_t[:, : config.ignore_top] = 0
        if config.ignore_bottom > 0:
            weights_t[:, -config.ignore_bottom :] = 0
        masks = class_mix_masks(source_labels, generator, config.class_mix_scope, config.ignore_index)[0]
        raw_source = denormalize(source_images.detach().float(), config.mean, config.std)
        raw_target = denormalize(target_images.detach().float(), config.mean, config.std)
        mixed, mixed_labels, mixed_weights = class_mix(raw_source, raw_target, source_labels, labels_t, weights_t, masks)
        mixed = strong_augment(mixed.clamp(0, 1), generator, config.jitter_strength, config.jitter_p,
                               config.blur_p, config.blur_sigma)
        mixed = normalize(mixed, config.mean, config.std).to(source_images.dtype)

    loss_target = model_loss(student, mixed, mixed_labels, mixed_weights, config.ignore_index)
    loss = loss_source + loss_target
    if loss_fdist is not None:
        loss = loss + loss_fdist

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if update_teacher and config.ema_timing == "after":
        ema_update(teacher, student, alpha)
    return {
        "loss": float(loss.detach()), "loss_source": float(loss_source.detach()),
        "loss_target": float(loss_target.detach()), "pseudo_weight": float(weight.mean()), "alpha": alpha,
        **({"loss_fdist": float(loss_fdist.detach())} if loss_fdist is not None else {}),
        "mixed_images": mixed.detach(), "mixed_labels": mixed_labels.detach(), "mixed_weights": mixed_weights.detach(),
        "masks": masks,
    }


class DACSTrainer:
    """Holds the student, its mean teacher, the optimiser and the step counter.

    Args:
        segmentor: The student (normalised images -> logits); trained in place.
        optimizer: Optimiser of its trainable parameters (default: AdamW, lr 6e-5, wd 0.01
            over every parameter requiring gradients).
        config: :class:`DACSConfig` (or a mapping of its fields).
        scheduler: Optional learning-rate scheduler, stepped every step.
        teacher: An existing teacher (default: :func:`make_teacher` of the segmentor).

    Example:
        >>> from torch import nn
        >>> trainer = DACSTrainer(nn.Conv2d(3, 2, 1), config={"seed": 1})
        >>> out = trainer.step(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), torch.randn(1, 3, 4, 4))
        >>> trainer.iteration, out["alpha"]
        (1, 0.0)
    """

    def __init__(
        self,
        segmentor: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        config: DACSConfig | Mapping[str, Any] | None = None,
        scheduler: Any | None = None,
        teacher: nn.Module | None = None,
    ) -> None:
        self.student = segmentor
        self.config = config if isinstance(config, DACSConfig) else DACSConfig.from_dict(config or {})
        self.teacher = teacher if teacher is not None else make_teacher(segmentor)
        if optimizer is None:
            params = [p for p in segmentor.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=6e-5, weight_decay=0.01)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.iteration = 0
        self.imagenet_encoder = None
        if self.config.fdist_lambda > 0:  # DAFormer's frozen copy of the initial (ImageNet) encoder
            self.imagenet_encoder = make_teacher(segmentor.get_submodule(self.config.fdist_module))

    def step(self, source_images: Tensor, source_labels: Tensor, target_images: Tensor) -> dict[str, Any]:
        """One step of :func:`dacs_step`; returns its dict."""
        out = dacs_step(self.student, self.teacher, self.optimizer, source_images, source_labels, target_images,
                        self.iteration, self.config, self.generator, self.scheduler,
                        imagenet_encoder=self.imagenet_encoder)
        self.iteration += 1
        return out
