"""Whole-image and sliding-window inference, and dataset evaluation.

Sliding window follows mmseg's ``slide_inference``: windows of ``crop`` placed every
``stride`` pixels, the last row/column of windows shifted back to end flush with the
image border, logits of overlapping windows averaged, so every pixel is in at least one
window (a stride larger than the crop, which would skip pixels, and non-positive sizes
are refused). Along an axis where the image is smaller than the crop there is one
window, the whole image, with no padding (as in mmseg), so the model never sees
padding that is not part of the image. Evaluation follows the benchmark protocol: an optional resize for
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
from .label_checks import check_label_range
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


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``value`` as (height, width) of positive ints; a clear error for anything else."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"sliding-window {name} must be a positive int or (height, width), got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"sliding-window {name} must be positive, got {value!r}")
    return pair  # type: ignore[return-value]


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis (mmseg's placement).

    Windows start every ``stride`` pixels; the last one is moved back to end flush with
    the border, so the windows cover ``0..length-1`` completely. A crop larger than the
    axis gives one window at 0 (the whole axis).

    Raises:
        ValueError: ``crop`` or ``stride`` below 1, or ``stride > crop`` (pixels
            between two windows would belong to none).

    Example:
        >>> window_starts(1024, 512, 341), window_starts(300, 512, 341)
        ([0, 341, 512], [0])
    """
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"cannot place windows on an axis of length {length!r}")
    if crop < 1 or stride < 1:
        raise ValueError(f"sliding-window crop and stride must be positive, got crop={crop}, stride={stride}")
    if stride > crop:
        raise ValueError(f"sliding-window stride {stride} is larger than the crop {crop}: the pixels between two "
                         "windows would be in none; use 1 <= stride <= crop")
    count = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride, length - crop), 0) for i in range(count)]


@torch.no_grad()
def slide_inference(model: Predictor, images: Tensor, num_classes: int, crop: int | tuple[int, int] = 512,
                    stride: int | tuple[int, int] = 341, batch_windows: int = 8) -> Tensor:
    """Sliding-window logits ``(B, K, H, W)``, every pixel the mean over the windows holding it.

    Args:
        model: Maps normalised ``(N, 3, h, w)`` images to ``(N, K, h, w)`` logits.
        images: Normalised images ``(B, 3, H, W)``.
        num_classes: ``K``.
        crop: Window size (int or (height, width)); an image smaller than the crop
            along an axis is one window along that axis (no padding).
        stride: Window stride (int or (height, width)), at most the crop.
        batch_windows: Windows per forward pass.

    Raises:
        ValueError: A non-positive crop, stride or ``batch_windows``, or a stride larger
            than the crop.

    Example:
        >>> model = torch.nn.Conv2d(3, 4, 1)
        >>> x = torch.randn(1, 3, 40, 70)
        >>> torch.allclose(slide_inference(model, x, 4, crop=32, stride=20), model(x), atol=1e-5)
        True
    """
    crop_h, crop_w = _pair(crop, "crop")
    stride_h, stride_w = _pair(stride, "stride")
    if not isinstance(batch_windows, int) or batch_windows < 1:
        raise ValueError(f"batch_windows must be a positive int, got {batch_windows!r}")
    batch, _, height, width = images.shape
    ys, xs = window_starts(height, crop_h, stride_h), window_starts(width, crop_w, stride_w)
    # every window has this size: the crop, or the whole axis where the image is smaller
    win_h, win_w = min(crop_h, height), min(crop_w, width)
    logits = images.new_zeros((batch, num_classes, height, width), dtype=torch.float32)
    count = images.new_zeros((1, 1, height, width), dtype=torch.float32)
    boxes = [(y, x) for y in ys for x in xs]
    for start in range(0, len(boxes), batch_windows):
        group = boxes[start : start + batch_windows]
        windows = [images[:, :, y : y + win_h, x : x + win_w] for y, x in group]
        outputs = model(torch.cat(windows)).float()
        if outputs.shape[-2:] != (win_h, win_w):
            outputs = F.interpolate(outputs, size=(win_h, win_w), mode="bilinear", align_corners=False)
        for i, (y, x) in enumerate(group):
            logits[:, :, y : y + win_h, x : x + win_w] += outputs[i * batch : (i + 1) * batch]
            count[:, :, y : y + win_h, x : x + win_w] += 1
    if not bool((count > 0).all()):  # pragma: no cover - window_starts guarantees coverage
        raise RuntimeError("sliding windows left pixels uncovered")
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

    Raises:
        LabelRangeError: A label holds an id outside ``0..num_classes-1`` (not ``ignore_index``);
            the message names the file.
        ValueError: ``limit`` below 1, a bad sliding window, or no image or no valid pixel
            at all (there would be no mIoU to report).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of images (or None for all), got {limit!r}")
    if mode == "slide":  # refuse a bad window before the first image, not after loading it
        (crop_h, crop_w), (stride_h, stride_w) = _pair(crop, "crop"), _pair(stride, "stride")
        window_starts(crop_h, crop_h, stride_h), window_starts(crop_w, crop_w, stride_w)
    elif mode != "whole":
        raise ValueError(f"unknown inference mode {mode!r}; use 'slide' or 'whole'")
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
            check_label_range(sample["label"], num_classes, sample.get("path") or f"image {seen}", ignore_index)
            prediction = predict(model, sample["image"], num_classes, mode, crop, stride, resize, mean, std, scale=scale)
            meter.update(prediction.cpu(), sample["label"])
            seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("the dataset gave no image to evaluate: an mIoU of nothing is not a result")
    if int(meter.matrix.sum()) == 0:
        raise ValueError(f"no valid pixel in the {seen} evaluated image(s): every label pixel is the ignore index "
                         f"{ignore_index}, so there is no mIoU to report (wrong label files or mapping?)")
    names = class_names if class_names is not None else getattr(dataset, "classes", None)
    result = meter.summary(list(names)[:num_classes] if names is not None else None)
    result.update(images=seen, seconds=time.perf_counter() - started)
    return result


def evaluate_many(model: nn.Module, datasets: Mapping[str, Iterable], num_classes: int, **options) -> dict[str, dict]:
    """:func:`evaluate` on each named dataset; options may be per dataset via ``{name: {...}}`` in ``per_dataset``."""
    per_dataset = options.pop("per_dataset", {}) or {}
    return {name: evaluate(model, data, num_classes, **{**options, **per_dataset.get(name, {})})
            for name, data in datasets.items()}
