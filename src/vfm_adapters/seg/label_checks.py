"""Label-range checks, so a class id the model cannot predict is an error naming its file.

Cross-entropy with an id ``>= num_classes`` fails deep inside PyTorch (a device-side
assert on CUDA), and a confusion matrix silently drops such pixels, which turns a
wrong ``num_classes`` or a wrong label mapping into a wrong mIoU. These checks run
when a dataset is opened (on a sample of its labels), on every training batch and on
every evaluated label.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .datasets import IGNORE_INDEX


class LabelRangeError(ValueError):
    """A label map holds class ids outside ``0..num_classes-1`` (and not the ignore index)."""


def check_label_range(label: Tensor, num_classes: int, source: str | Sequence[str | None] | None = None,
                      ignore_index: int = IGNORE_INDEX) -> None:
    """Raises :class:`LabelRangeError` if ``label`` holds an id outside ``0..num_classes-1`` other than ``ignore_index``.

    Args:
        label: Label map(s) ``(H, W)`` or ``(B, H, W)`` of train ids.
        num_classes: The model's classes.
        source: The file (or, for a batch, the files in batch order) named in the error.
        ignore_index: The id that is not evaluated.

    Example:
        >>> check_label_range(torch.tensor([[0, 2, 255]]), 3)
        >>> check_label_range(torch.tensor([[0, 5]]), 3, "a.png")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        vfm_adapters.seg.label_checks.LabelRangeError: label of a.png holds class id(s) [5] ...
    """
    bad = (label != ignore_index) & ((label < 0) | (label >= num_classes))
    if not bool(bad.any()):
        return
    where = source
    if label.ndim == 3 and source is not None and not isinstance(source, str):
        first = int(bad.flatten(1).any(1).nonzero()[0, 0])
        where = source[first] if first < len(source) else None
    values = torch.unique(label[bad]).tolist()
    raise LabelRangeError(
        f"label of {where or 'a sample'} holds class id(s) {values[:10]} outside 0..{num_classes - 1} "
        f"(and not the ignore index {ignore_index}): set model.num_classes to the dataset's classes, or map "
        "the ids to train ids (e.g. a dataset 'mapping')")


def check_dataset_labels(dataset: Any, num_classes: int, name: str = "dataset", samples: int = 4,
                         ignore_index: int = IGNORE_INDEX) -> None:
    """Checks the labels of ``samples`` evenly spaced images of ``dataset`` (a sampled pass when it is opened).

    Uses the reader's untransformed ``load(i)`` when it has one. Raises
    :class:`LabelRangeError` naming the file, or ``ValueError`` for an empty dataset.

    Example:
        >>> from vfm_adapters.seg.synthetic import SyntheticScenes
        >>> check_dataset_labels(SyntheticScenes("source", 2, 32), 7)
        >>> check_dataset_labels(SyntheticScenes("source", 2, 32), 3, "scenes")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        vfm_adapters.seg.label_checks.LabelRangeError: label of ... holds class id(s) ...
    """
    size = len(dataset)
    if size == 0:
        raise ValueError(f"{name} holds no image")
    read = getattr(dataset, "load", None) or dataset.__getitem__
    count = min(size, max(int(samples), 1))
    indices = sorted({round(i * (size - 1) / max(count - 1, 1)) for i in range(count)})
    for index in indices:
        sample = read(index)
        label = sample["label"]
        label = label if isinstance(label, Tensor) else torch.as_tensor(label)
        check_label_range(label, num_classes, str(sample.get("path") or f"{name}[{index}]"), ignore_index)
