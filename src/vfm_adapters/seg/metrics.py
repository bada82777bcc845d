"""mIoU and per-class IoU from a confusion matrix, and the per-dataset results table.

The confusion matrix is accumulated over a whole dataset (rows: ground truth, columns:
prediction), then IoU per class = TP / (TP + FP + FN). A class that appears neither in
the ground truth nor in the predictions of a dataset has no IoU (NaN) and is left out
of the mean, as mmseg does: e.g. SYNTHIA-trained models evaluated on 16 classes.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .datasets import IGNORE_INDEX


def confusion_matrix(prediction: Tensor, label: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(num_classes, num_classes)`` int64 counts, rows = ground truth, columns = prediction.

    Pixels labelled ``ignore_index`` (or outside ``0..num_classes-1``) are not counted.

    Example:
        >>> confusion_matrix(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 255]), 2).tolist()
        [[1, 1], [0, 1]]
    """
    prediction, label = prediction.reshape(-1).long(), label.reshape(-1).long()
    if prediction.shape != label.shape:
        raise ValueError(f"prediction has {prediction.numel()} pixels, label {label.numel()}")
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
    index = label[valid] * num_classes + prediction[valid].clamp(0, num_classes - 1)
    return torch.bincount(index.cpu(), minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(matrix: Tensor | np.ndarray) -> np.ndarray:
    """Per-class IoU = TP / (TP + FP + FN); NaN where a class is absent from both.

    Example:
        >>> iou_from_confusion(np.array([[3, 1], [2, 4]])).round(4).tolist()
        [0.5, 0.5714]
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def summarize(matrix: Tensor | np.ndarray, class_names: Sequence[str] | None = None) -> dict:
    """mIoU, pixel accuracy and per-class IoU (all in percent) from a confusion matrix.

    Example:
        >>> r = summarize(np.array([[3, 1], [2, 4]]), ["a", "b"])
        >>> round(r["mIoU"], 2), round(r["aAcc"], 1), round(r["IoU"]["a"], 1)
        (53.57, 70.0, 50.0)
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    iou = iou_from_confusion(matrix) * 100
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    total = matrix.sum()
    present = ~np.isnan(iou)
    return {
        "mIoU": float(np.mean(iou[present])) if present.any() else float("nan"),
        "aAcc": float(np.diag(matrix).sum() / total * 100) if total > 0 else float("nan"),
        "IoU": {name: float(value) for name, value in zip(names, iou)},
        "pixels": int(total),
    }


class ConfusionMeter:
    """Accumulates a confusion matrix over batches.

    Example:
        >>> meter = ConfusionMeter(2)
        >>> meter.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
        >>> meter.matrix.tolist()
        [[1, 1], [0, 0]]
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, prediction: Tensor, label: Tensor) -> None:
        self.matrix += confusion_matrix(prediction, label, self.num_classes, self.ignore_index)

    def summary(self, class_names: Sequence[str] | None = None) -> dict:
        return summarize(self.matrix, class_names)


def _cell(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def results_table(results: Mapping[str, Mapping[str, dict]] | Mapping[str, dict], per_class: bool = False,
                  average: Sequence[str] | None = None) -> str:
    """A Markdown table of mIoU per dataset (columns) and run (rows).

    ``results`` is ``{dataset: summary}`` for one run, or ``{run: {dataset: summary}}``
    to compare runs (e.g. methods). ``average`` names the datasets whose mean is added
    as a last column (all by default when there is more than one). With ``per_class``
    a table of per-class IoU per dataset follows (one run only).

    Example:
        >>> print(results_table({"rein": {"source": {"mIoU": 80.0}, "fog": {"mIoU": 60.0}}}))
        | run | source | fog | avg |
        |---|---|---|---|
        | rein | 80.0 | 60.0 | 70.0 |
    """
    first = next(iter(results.values()), {})
    runs = results if first and all(isinstance(v, Mapping) and "mIoU" not in v for v in results.values()) else {"": results}
    datasets: list[str] = []
    for per_dataset in runs.values():
        datasets += [d for d in per_dataset if d not in datasets]
    if average is None:
        average = datasets if len(datasets) > 1 else []
    header = ["run"] + datasets + (["avg"] if average else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run, per_dataset in runs.items():
        cells = [run or "-"] + [_cell(per_dataset[d]["mIoU"]) if d in per_dataset else "" for d in datasets]
        if average:
            values = [per_dataset[d]["mIoU"] for d in average if d in per_dataset]
            cells.append(_cell(float(np.mean(values))) if values else "")
        lines.append("| " + " | ".join(cells) + " |")
    if per_class and len(runs) == 1:
        per_dataset = next(iter(runs.values()))
        classes = list(next(iter(per_dataset.values())).get("IoU", {}))
        if classes:
            lines += ["", "| class | " + " | ".join(datasets) + " |", "|" + "---|" * (len(datasets) + 1)]
            for name in classes:
                lines.append("| " + name + " | " + " | ".join(_cell(per_dataset[d]["IoU"].get(name, float("nan"))) for d in datasets) + " |")
    return "\n".join(lines)
