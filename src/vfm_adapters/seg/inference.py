"""Whole-image and sliding-window inference, and dataset evaluation.

Sliding window follows mmseg's ``slide_inference``: windows of ``crop`` placed every
``stride`` pixels, the last row/column of windows shifted back to end at the image
border, logits of overlapping windows averaged. An image (or a window) smaller than
the crop is padded to the crop size at the bottom/right and the padded part of the
logits is discarded. Evaluation follows the benchmark protocol: an optional resize for
inference (e.g. Cityscapes at 1024x512) and logits resized back to the label's own
resolution before the confusion matrix is accumulated.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .datasets import IGNORE_INDEX
from .metrics import ConfusionMeter
from .transforms import IMAGENET_MEAN, IMAGENET_STD

Predictor = Callable[[Tensor], Tensor]


@torch.no_grad()
def whole_inference(model: Predictor, images: Tensor) -> Tensor:
    """Logits ``(B, K, H, W)`` of the whole image in one pass."""
    logits = model(images)
    if logits.shape[-2:] != images.shape[-2:]:
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return logits


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis (mmseg's placement).

    Example:
        >>> window_starts(1024, 512, 341), window_starts(300, 512, 341)
        ([0, 341, 512], [0])
    """
    count = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride, length - crop), 0) for i in range(count)]


@torch.no_grad()
def slide_inference(model: Predictor, images: Tensor, num_classes: int, crop: int | tuple[int, int] = 512,
                    stride: int | tuple[int, int] = 341, batch_windows: int = 8) -> Tensor:
    """Sliding-window logits ``(B, K, H, W)``; windows are padded to ``crop`` when needed.

    Args:
        model: Maps normalised ``(N, 3, h, w)`` images to ``(N, K, h, w)`` logits.
        images: Normalised images ``(B, 3, H, W)``.
        num_classes: ``K``.
        crop: Window size (int or (height, width)).
        stride: Window stride (int or (height, width)).
        batch_windows: Windows per forward pass.

    Example:
        >>> model = torch.nn.Conv2d(3, 4, 1)
        >>> x = torch.randn(1, 3, 40, 70)
        >>> torch.allclose(slide_inference(model, x, 4, crop=32, stride=20), model(x), atol=1e-5)
        True
    """
    crop_h, crop_w = (crop, crop) if isinstance(crop, int) else crop
    stride_h, stride_w = (stride, stride) if isinstance(stride, int) else stride
    batch, _, height, width = images.shape
    logits = images.new_zeros((batch, num_classes, height, width), dtype=torch.float32)
    count = images.new_zeros((1, 1, height, width), dtype=torch.float32)
    boxes = [(y, x) for y in window_starts(height, crop_h, stride_h) for x in window_starts(width, crop_w, stride_w)]
    for start in range(0, len(boxes), batch_windows):
        group = boxes[start : start + batch_windows]
        windows = []
        for y, x in group:
            window = images[:, :, y : y + crop_h, x : x + crop_w]
            pad_h, pad_w = crop_h - window.shape[-2], crop_w - window.shape[-1]
            if pad_h > 0 or pad_w > 0:
                window = F.pad(window, (0, pad_w, 0, pad_h))
            windows.append(window)
        outputs = model(torch.cat(windows)).float()
        if outputs.shape[-2:] != (crop_h, crop_w):
            outputs = F.interpolate(outputs, size=(crop_h, crop_w), mode="bilinear", align_corners=False)
        for i, (y, x) in enumerate(group):
            h, w = min(crop_h, height - y), min(crop_w, width - x)
            logits[:, :, y : y + h, x : x + w] += outputs[i * batch : (i + 1) * batch, :, :h, :w]
            count[:, :, y : y + h, x : x + w] += 1
    return logits / count


def normalize(images: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """uint8 (or 0..255 float) images -> normalised float images."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() - mean_t) / std_t


@torch.no_grad()
def predict(model: nn.Module, image: Tensor, num_classes: int, mode: str = "slide", crop: int = 512, stride: int = 341,
            resize: tuple[int, int] | None = None, mean: Sequence[float] = IMAGENET_MEAN,
            std: Sequence[float] = IMAGENET_STD, scale: tuple[int, int] | None = None) -> Tensor:
    """Class map ``(H, W)`` for one uint8 image ``(3, H, W)`` at its own resolution.

    ``resize`` = (width, height) runs inference at that size; ``scale`` = (long, short)
    at the largest keep-ratio size fitting it (mmseg's ``Resize(scale, keep_ratio=True)``,
    e.g. (1024, 512) for half-size Mapillary). Logits are resized back either way.
    """
    device = next(model.parameters()).device
    x = normalize(image[None].to(device), mean, std)
    height, width = x.shape[-2:]
    if resize is not None and scale is not None:
        raise ValueError("give resize=(width, height) or scale=(long, short), not both")
    if scale is not None:
        from .transforms import rescale_size

        x = F.interpolate(x, size=rescale_size(height, width, tuple(scale)), mode="bilinear", align_corners=False)
    if resize is not None:
        x = F.interpolate(x, size=(resize[1], resize[0]), mode="bilinear", align_corners=False)
    if mode == "slide":
        logits = slide_inference(model, x, num_classes, crop, stride)
    elif mode == "whole":
        logits = whole_inference(model, x)
    else:
        raise ValueError(f"unknown inference mode {mode!r}; use 'slide' or 'whole'")
    if logits.shape[-2:] != (height, width):
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return logits.argmax(1)[0]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Iterable, num_classes: int, class_names: Sequence[str] | None = None,
             mode: str = "slide", crop: int = 512, stride: int = 341, resize: tuple[int, int] | None = None,
             mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
             ignore_index: int = IGNORE_INDEX, limit: int | None = None, progress: bool = False,
             scale: tuple[int, int] | None = None) -> dict:
    """mIoU of ``model`` on a dataset of raw samples (uint8 image, train-id label).

    Returns:
        :func:`~vfm_adapters.seg.metrics.summarize`'s dict plus ``images`` and ``seconds``.
    """
    was_training = model.training
    model.eval()
    meter = ConfusionMeter(num_classes, ignore_index)
    started, seen = time.perf_counter(), 0
    total = len(dataset) if hasattr(dataset, "__len__") else None
    if limit is not None and total is not None:
        total = min(total, limit)
    indices = range(total) if total is not None else None
    iterator = (dataset[i] for i in indices) if indices is not None else iter(dataset)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=total, desc="eval", leave=False)
    try:
        for sample in iterator:
            if limit is not None and seen >= limit:
                break
            prediction = predict(model, sample["image"], num_classes, mode, crop, stride, resize, mean, std, scale=scale)
            meter.update(prediction.cpu(), sample["label"])
            seen += 1
    finally:
        model.train(was_training)
    names = class_names if class_names is not None else getattr(dataset, "classes", None)
    result = meter.summary(list(names)[:num_classes] if names is not None else None)
    result.update(images=seen, seconds=time.perf_counter() - started)
    return result


def evaluate_many(model: nn.Module, datasets: Mapping[str, Iterable], num_classes: int, **options) -> dict[str, dict]:
    """:func:`evaluate` on each named dataset; options may be per dataset via ``{name: {...}}`` in ``per_dataset``."""
    per_dataset = options.pop("per_dataset", {}) or {}
    return {name: evaluate(model, data, num_classes, **{**options, **per_dataset.get(name, {})})
            for name, data in datasets.items()}
