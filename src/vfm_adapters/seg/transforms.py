"""Joint image/label transforms: every geometric step moves image and label together.

A transform is called as ``transform(sample, rng=generator)`` on a sample dict
``{"image": (3, H, W) tensor, "label": (H, W) int64 tensor, ...}`` and returns a new
dict. Randomness comes only from the ``numpy.random.Generator`` passed in, so an
augmentation is reproducible from its seed (the training stream seeds each sample by
its position, which makes resumed runs exact). Without ``rng`` a fresh unseeded
generator is used.

The pipeline of the Rein authors' released configs (``train_transform(resize="short_side_choice")``)::

    Compose([RandomChoiceResize(paper_short_sides(512), max_long_side=2048),
             RandomCrop((512, 512), cat_max_ratio=0.75, pad=False), RandomFlip(0.5),
             PhotoMetricDistortion(), Normalize(), Pad((512, 512))])

i.e. mmseg's ``RandomChoiceResize(resize_type="ResizeShortestEdge")``, a crop that is
padded only after normalisation (image 0, label 255, as mmseg's data preprocessor
does). The older keep-ratio rescale around 1280x720 by 0.5-2.0 (:class:`RandomRescale`,
``resize="ratio_range"``) stays available for other recipes.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .label_maps import IGNORE_INDEX
from .photometric import PhotoMetricDistortion, hsv_to_rgb, rgb_to_hsv  # re-exported: defined here first

Sample = dict[str, Any]

#: ImageNet statistics on the 0..255 scale (mmseg's defaults).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng()


def resize_sample(sample: Sample, height: int, width: int, image_mode: str = "bilinear") -> Sample:
    """Resizes image (``image_mode``) and label (nearest) to ``height`` x ``width``."""
    out = dict(sample)
    image = sample["image"]
    if tuple(image.shape[-2:]) != (height, width):
        dtype = image.dtype
        resized = F.interpolate(image[None].float(), size=(height, width), mode=image_mode,
                                **({"align_corners": False} if image_mode in ("bilinear", "bicubic") else {}))[0]
        if dtype == torch.uint8:
            resized = resized.round().clamp(0, 255).to(torch.uint8)
        out["image"] = resized
    if "label" in sample and tuple(sample["label"].shape[-2:]) != (height, width):
        label = sample["label"]
        out["label"] = F.interpolate(label[None, None].float(), size=(height, width), mode="nearest-exact")[0, 0].to(label.dtype)
    return out


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmseg's keep-ratio rescale: the largest size fitting ``scale`` = (long, short) edges.

    Example:
        >>> rescale_size(1052, 1914, (1280, 720))   # GTA5 -> about 1280x720
        (704, 1280)
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class Compose:
    """Applies transforms in order, passing the same generator to each.

    Example:
        >>> import torch
        >>> t = Compose([RandomFlip(1.0), Normalize(mean=(0, 0, 0), std=(1, 1, 1))])
        >>> s = t({"image": torch.arange(3, dtype=torch.uint8).expand(3, 1, 3), "label": torch.tensor([[0, 1, 2]])})
        >>> s["label"].tolist(), s["image"][0].tolist()
        ([[2, 1, 0]], [[2.0, 1.0, 0.0]])
    """

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        for transform in self.transforms:
            sample = transform(sample, rng=rng)
        return sample

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class Resize:
    """Resizes to a fixed ``(height, width)``, or keep-ratio into ``scale`` = (long, short).

    Args:
        size: Exact output ``(height, width)``.
        scale: mmseg-style keep-ratio target, e.g. ``(2048, 512)`` or ``(1280, 720)``.
        image_mode: Interpolation of the image (the label is always nearest).
    """

    def __init__(self, size: tuple[int, int] | None = None, scale: tuple[int, int] | None = None,
                 image_mode: str = "bilinear") -> None:
        if (size is None) == (scale is None):
            raise ValueError("give exactly one of size=(height, width) or scale=(long, short)")
        self.size, self.scale, self.image_mode = size, scale, image_mode

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        height, width = sample["image"].shape[-2:]
        target = tuple(self.size) if self.size is not None else rescale_size(height, width, self.scale)
        return resize_sample(sample, *target, image_mode=self.image_mode)

    def __repr__(self) -> str:
        return f"Resize(size={self.size}, scale={self.scale})"


class RandomRescale:
    """Keep-ratio rescale into ``scale`` times a random ratio from ``ratio_range``.

    This is mmseg's ``Resize(img_scale=scale, ratio_range=...)``: Rein trains on GTA5
    rescaled around 1280x720 by 0.5-2.0.
    """

    def __init__(self, scale: tuple[int, int], ratio_range: tuple[float, float] = (0.5, 2.0),
                 image_mode: str = "bilinear") -> None:
        self.scale, self.ratio_range, self.image_mode = tuple(scale), tuple(ratio_range), image_mode

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        ratio = float(_rng(rng).uniform(*self.ratio_range))
        height, width = sample["image"].shape[-2:]
        scaled = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        return resize_sample(sample, *rescale_size(height, width, scaled), image_mode=self.image_mode)

    def __repr__(self) -> str:
        return f"RandomRescale(scale={self.scale}, ratio_range={self.ratio_range})"


def paper_short_sides(crop: int = 512) -> tuple[int, ...]:
    """The authors' 16 short sides ``int(crop * x * 0.1)`` for x = 5..20 (0.5 to 2.0 times the crop).

    Example:
        >>> sides = paper_short_sides(512)
        >>> len(sides), sides[:3], sides[-1], sum(sides) / len(sides)
        (16, (256, 307, 358), 1024, 639.625)
    """
    return tuple(int(crop * x * 0.1) for x in range(5, 21))


def shortest_edge_size(height: int, width: int, short_side: int, max_long_side: int | None = None) -> tuple[int, int]:
    """mmseg's ``ResizeShortestEdge``: short side to ``short_side``, long side capped at ``max_long_side``.

    Returns ``(height, width)``, rounded to the nearest integer as mmseg does.

    Example:
        >>> shortest_edge_size(1052, 1914, 1024, 2048), shortest_edge_size(1052, 1914, 256, 2048)  # GTA5
        ((1024, 1863), (256, 466))
        >>> shortest_edge_size(1000, 3000, 1024, 2048)   # capped by the long side
        (683, 2048)
    """
    factor = short_side / min(height, width)
    new_h, new_w = height * factor, width * factor
    if max_long_side is not None and max(new_h, new_w) > max_long_side:
        cap = max_long_side / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    return int(new_h + 0.5), int(new_w + 0.5)


class RandomChoiceResize:
    """Short side drawn uniformly from ``short_sides``, long side at most ``max_long_side``.

    mmseg's ``RandomChoiceResize(scales, resize_type="ResizeShortestEdge", max_size)``,
    which the Rein authors train with (``paper_short_sides(512)``, cap 2048).
    """

    def __init__(self, short_sides: Sequence[int], max_long_side: int | None = 2048, image_mode: str = "bilinear") -> None:
        self.short_sides = tuple(int(s) for s in short_sides)
        if not self.short_sides or min(self.short_sides) < 1:
            raise ValueError(f"short_sides must be positive integers, got {list(short_sides)}")
        self.max_long_side, self.image_mode = max_long_side, image_mode

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        short = self.short_sides[int(_rng(rng).integers(len(self.short_sides)))]
        height, width = sample["image"].shape[-2:]
        return resize_sample(sample, *shortest_edge_size(height, width, short, self.max_long_side),
                             image_mode=self.image_mode)

    def __repr__(self) -> str:
        return f"RandomChoiceResize(short_sides={self.short_sides}, max_long_side={self.max_long_side})"


def pad_sample(sample: Sample, height: int, width: int, image_value: float = 0, label_value: int = IGNORE_INDEX) -> Sample:
    """Pads bottom/right up to ``height`` x ``width`` (label padded with ignore)."""
    h, w = sample["image"].shape[-2:]
    if h >= height and w >= width:
        return sample
    out = dict(sample)
    pad = (0, max(width - w, 0), 0, max(height - h, 0))
    out["image"] = F.pad(sample["image"], pad, value=image_value)
    if "label" in sample:
        out["label"] = F.pad(sample["label"], pad, value=label_value)
    return out


class RandomCrop:
    """Random crop of ``size`` = (height, width); pads (label with 255) if the image is smaller.

    With ``cat_max_ratio < 1`` the crop is re-drawn (up to 10 times) while one class
    covers more than that share of the crop's labelled pixels, as mmseg does (0.75 in
    Rein's recipe), so crops of nearly only road or sky are avoided.
    """

    def __init__(self, size: tuple[int, int], cat_max_ratio: float = 1.0, ignore_index: int = IGNORE_INDEX,
                 pad: bool = True) -> None:
        self.size, self.cat_max_ratio, self.ignore_index = tuple(size), float(cat_max_ratio), ignore_index
        self.pad = bool(pad)  # False: a smaller image gives a smaller crop (pad later, e.g. with Pad)

    def _offsets(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int]:
        return int(rng.integers(0, max(height - self.size[0], 0) + 1)), int(rng.integers(0, max(width - self.size[1], 0) + 1))

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = _rng(rng)
        height, width = sample["image"].shape[-2:]
        top, left = self._offsets(height, width, rng)
        if self.cat_max_ratio < 1.0 and "label" in sample:
            for _ in range(10):
                crop = sample["label"][top : top + self.size[0], left : left + self.size[1]]
                counts = torch.bincount(crop[crop != self.ignore_index].flatten())
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                    break
                top, left = self._offsets(height, width, rng)
        out = dict(sample)
        out["image"] = sample["image"][..., top : top + self.size[0], left : left + self.size[1]]
        if "label" in sample:
            out["label"] = sample["label"][top : top + self.size[0], left : left + self.size[1]]
        return pad_sample(out, *self.size, label_value=self.ignore_index) if self.pad else out

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, cat_max_ratio={self.cat_max_ratio})"


class Pad:
    """Pads bottom/right to ``size``: image with ``image_value``, label with ``label_value``.

    Placed after :class:`Normalize` it is mmseg's data preprocessor (image 0 after
    normalisation, i.e. the mean colour; label 255).

    Example:
        >>> out = Pad((4, 4))({"image": torch.ones(3, 2, 3), "label": torch.zeros(2, 3, dtype=torch.long)})
        >>> out["image"][0, 3].tolist(), out["label"][:, 3].tolist()
        ([0.0, 0.0, 0.0, 0.0], [255, 255, 255, 255])
    """

    def __init__(self, size: tuple[int, int], image_value: float = 0.0, label_value: int = IGNORE_INDEX) -> None:
        self.size, self.image_value, self.label_value = tuple(size), image_value, label_value

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        return pad_sample(sample, *self.size, image_value=self.image_value, label_value=self.label_value)

    def __repr__(self) -> str:
        return f"Pad(size={self.size}, image_value={self.image_value}, label_value={self.label_value})"


class RandomFlip:
    """Horizontal flip of image and label with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        if _rng(rng).random() >= self.p:
            return sample
        out = dict(sample)
        out["image"] = sample["image"].flip(-1)
        if "label" in sample:
            out["label"] = sample["label"].flip(-1)
        return out

    def __repr__(self) -> str:
        return f"RandomFlip(p={self.p})"


class Normalize:
    """``(image - mean) / std`` on the 0..255 scale, giving the backbone's float input."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        out = dict(sample)
        out["image"] = (sample["image"].float() - self.mean) / self.std
        return out

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def train_transform(
    crop_size: tuple[int, int] = (512, 512),
    scale: tuple[int, int] | None = (1280, 720),
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip: float = 0.5,
    photometric: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resize: str = "ratio_range",
    short_sides: Sequence[int] | None = None,
    max_long_side: int | None = None,
) -> Compose:
    """The training pipeline: resize, crop, flip, photometric distortion, normalise, pad.

    Args:
        resize: ``"short_side_choice"`` (the Rein authors' configs: short side drawn from
            ``short_sides``, default :func:`paper_short_sides` of the crop height, long side
            at most ``max_long_side``, default 4 x the crop height, i.e. 2048 at 512) or
            ``"ratio_range"`` (keep-ratio rescale into ``scale`` x U(``ratio_range``)).
        The crop is padded after normalisation (image 0, label 255), as mmseg does.

    Example:
        >>> import torch
        >>> t = train_transform(crop_size=(32, 32), scale=(64, 48))
        >>> s = t({"image": torch.zeros(3, 60, 80, dtype=torch.uint8), "label": torch.zeros(60, 80, dtype=torch.long)},
        ...       rng=np.random.default_rng(0))
        >>> s["image"].shape, s["label"].shape
        (torch.Size([3, 32, 32]), torch.Size([32, 32]))
    """
    steps: list[Callable] = []
    if resize == "short_side_choice":
        sides = tuple(short_sides) if short_sides else paper_short_sides(int(crop_size[0]))
        steps.append(RandomChoiceResize(sides, int(max_long_side) if max_long_side else 4 * int(crop_size[0])))
    elif resize == "ratio_range":
        if scale is not None:
            steps.append(RandomRescale(tuple(scale), tuple(ratio_range)))
    else:
        raise ValueError(f"unknown train resize {resize!r}; use 'short_side_choice' (the Rein authors') or 'ratio_range'")
    steps.append(RandomCrop(tuple(crop_size), cat_max_ratio=cat_max_ratio, pad=False))
    if flip > 0:
        steps.append(RandomFlip(flip))
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps.append(Normalize(mean, std))
    steps.append(Pad(tuple(crop_size)))
    return Compose(steps)


def eval_transform(size: tuple[int, int] | None = None, scale: tuple[int, int] | None = None,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Compose:
    """Test-time pipeline: optional resize, then normalisation."""
    steps: list[Callable] = []
    if size is not None or scale is not None:
        steps.append(Resize(size=tuple(size) if size is not None else None, scale=tuple(scale) if scale is not None else None))
    steps.append(Normalize(mean, std))
    return Compose(steps)
