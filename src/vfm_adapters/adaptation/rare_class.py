"""DAFormer's rare-class sampling (RCS) of source images ("DAFormer: Improving Network
Architectures and Training Strategies for Domain-Adaptive Semantic Segmentation").

A class ``c`` is drawn with ``P(c) = softmax((1 - f_c) / T)`` (``f_c`` its pixel share,
``T = 0.01``), then an image holding more than ``min_pixels`` of it; the crop of that
image is re-drawn until it holds the class (:class:`RareClassCrops`).
:class:`RareClassPositions` keys the draws by stream position so a resumed run draws
what an uninterrupted one would.

Example:
    >>> sampler = RareClassSampler(np.array([[5000, 0], [5000, 4000]]), length=3)
    >>> list(sampler)   # the rare class 1 is only in image 1, and class 0 is too common to be drawn
    [1, 1, 1]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from ..seg.datasets import IGNORE_INDEX

__all__ = ["RareClassCrops", "RareClassPositions", "RareClassSampler", "class_pixel_counts", "rare_class_probabilities"]


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
