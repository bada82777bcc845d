"""Procedural street scenes with a source domain and shifted target domains (the demo's data).

No real dataset or pretrained weight can be downloaded everywhere, so the demo makes its
own domain-generalisation benchmark: street-like scenes of seven classes drawn as
textured shapes, each class with its own texture so that a small ViT can tell them
apart by more than colour:

========== ===========================================================
class      appearance
========== ===========================================================
sky        smooth vertical blue gradient with soft low-frequency clouds
road       grey asphalt with fine grain and dashed white lane markings
building   brick/concrete facades with a regular grid of dark windows
vegetation green canopies and grass with strong high-frequency speckle
car        saturated body colour (any hue), dark wheels band, glass band
person     thin upright figure: skin-tone head, clothes, legs
pole       thin dark-grey vertical bar with a vertical gradient
========== ===========================================================

Target domains change only the appearance, never the layout or labels: ``fog``
(depth-dependent haze, densest at the horizon), ``night`` (dark, blue-tinted, gamma
and sensor noise), ``noise`` (strong Gaussian noise) and ``colour`` (a hue rotation and
saturation boost). The same image index gives the same scene in every domain, so
differences in mIoU across domains are due to the shift alone.
"""

from __future__ import annotations

import colorsys
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

SYNTHETIC_CLASSES: tuple[str, ...] = ("sky", "road", "building", "vegetation", "car", "person", "pole")
SKY, ROAD, BUILDING, VEGETATION, CAR, PERSON, POLE = range(7)
DOMAINS: tuple[str, ...] = ("source", "fog", "night", "noise", "colour")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    grid = rng.random((cells + 1, cells + 1))
    coords = np.linspace(0, cells, size, endpoint=False)
    i = coords.astype(int)
    f = coords - i
    f = f * f * (3 - 2 * f)
    top = grid[i][:, i] * (1 - f)[None, :] + grid[i][:, i + 1] * f[None, :]
    bottom = grid[i + 1][:, i] * (1 - f)[None, :] + grid[i + 1][:, i + 1] * f[None, :]
    return top * (1 - f)[:, None] + bottom * f[:, None]


@dataclass
class _Canvas:
    """A scene being drawn: its image and label arrays, pixel coordinates and horizon row."""

    image: np.ndarray
    label: np.ndarray
    yy: np.ndarray
    xx: np.ndarray
    size: int
    horizon: int

    def paint(self, mask: np.ndarray, colour: np.ndarray, cls: int) -> None:
        """Draws ``colour`` (one RGB, or an (H, W, 3) image) and class ``cls`` where ``mask`` holds."""
        self.image[mask] = colour[mask] if colour.ndim == 3 else colour
        self.label[mask] = cls


def _draw_sky(rng: np.random.Generator, canvas: _Canvas) -> None:
    """Sky everywhere: a vertical gradient plus soft clouds."""
    s, yy = canvas.size, canvas.yy
    t = (yy / max(canvas.horizon, 1)).clip(0, 1)[..., None]
    top, low = np.array([0.25, 0.45, 0.85]), np.array([0.65, 0.78, 0.95])
    clouds = _smooth_noise(rng, s, 3)[..., None] * rng.uniform(0.1, 0.3)
    canvas.image[:] = top * (1 - t) + low * t + clouds
    canvas.label[:] = SKY


def _draw_ground(rng: np.random.Generator, canvas: _Canvas) -> tuple[np.ndarray, float, float]:
    """Grass everywhere below the horizon and a road trapezoid with dashed lane markings.

    Returns the road mask, the road's vanishing column and its spread (width per row of depth).
    """
    s, yy, xx, horizon, image = canvas.size, canvas.yy, canvas.xx, canvas.horizon, canvas.image
    ground = yy >= horizon
    grass = np.array([0.25, 0.55, 0.18]) * rng.uniform(0.8, 1.1)
    speckle = rng.random((s, s, 1)) * 0.35 - 0.17
    image[ground] = (grass + speckle * np.array([0.6, 1.0, 0.4]))[ground]
    canvas.label[ground] = VEGETATION
    vanish = s * rng.uniform(0.35, 0.65)
    spread = rng.uniform(0.9, 1.8)
    depth = (yy - horizon).clip(0)
    road = ground & (np.abs(xx - vanish) <= depth * spread + 1)
    grey = rng.uniform(0.33, 0.45)
    grain = rng.normal(0, 0.03, (s, s, 1))
    image[road] = (np.full(3, grey) + grain)[road]
    dash = road & (np.abs(xx - vanish) <= 0.6 + depth * 0.04) & (((depth ** 0.7).astype(int) // 2) % 2 == 0) & (depth > 2)
    image[dash] = 0.92
    canvas.label[road] = ROAD
    return road, vanish, spread


def _draw_buildings(rng: np.random.Generator, canvas: _Canvas, road: np.ndarray) -> None:
    """Facades standing on the horizon, each with a regular grid of dark windows."""
    s, yy, xx, horizon = canvas.size, canvas.yy, canvas.xx, canvas.horizon
    for _ in range(rng.integers(2, 6)):
        x0 = rng.uniform(-0.1, 0.9) * s
        w = rng.uniform(0.12, 0.35) * s
        h = rng.uniform(0.12, 0.4) * s
        base = horizon + rng.uniform(0, 0.03) * s
        mask = (xx >= x0) & (xx < x0 + w) & (yy >= base - h) & (yy < base) & ~road
        facade = np.array(colorsys.hsv_to_rgb(rng.uniform(0.0, 0.12), rng.uniform(0.2, 0.55), rng.uniform(0.45, 0.8)))
        period = rng.integers(4, 7)
        windows = ((xx - x0) % period < period / 2) & ((yy - base) % period < period / 2)
        colour = np.broadcast_to(facade, (s, s, 3)).copy()
        colour[windows] = colour[windows] * 0.35 + np.array([0.1, 0.12, 0.2])
        canvas.paint(mask, colour, BUILDING)


def _draw_trees(rng: np.random.Generator, canvas: _Canvas, road: np.ndarray) -> None:
    """Noisy green blobs near the horizon."""
    s, yy, xx, horizon = canvas.size, canvas.yy, canvas.xx, canvas.horizon
    for _ in range(rng.integers(1, 5)):
        cx, cy = rng.uniform(0, 1) * s, horizon - rng.uniform(0.0, 0.2) * s
        r = rng.uniform(0.06, 0.14) * s
        wobble = _smooth_noise(rng, s, 6) * r * 0.6
        mask = (np.hypot(xx - cx, yy - cy) < r + wobble - r * 0.3) & ~road
        leaves = np.array([0.15, 0.45, 0.12]) * rng.uniform(0.7, 1.2) + rng.random((s, s, 1)) * 0.3 * np.array([0.5, 1.0, 0.3])
        canvas.paint(mask, leaves, VEGETATION)


def _draw_pole(rng: np.random.Generator, canvas: _Canvas, bottom: float, scale: float) -> None:
    """A thin dark-grey vertical bar, lighter towards its foot."""
    s, yy, xx = canvas.size, canvas.yy, canvas.xx
    x0 = rng.uniform(0, 1) * s
    w = max(1.5, 3.0 * scale + 1)
    top_y = bottom - (0.35 + 0.5 * scale) * s
    mask = (xx >= x0) & (xx < x0 + w) & (yy >= top_y) & (yy < bottom)
    shade = (0.18 + 0.25 * ((yy - top_y) / max(bottom - top_y, 1)).clip(0, 1))[..., None] * np.ones(3)
    canvas.paint(mask, shade, POLE)


def _draw_car(rng: np.random.Generator, canvas: _Canvas, bottom: float, scale: float,
              vanish: float, spread: float) -> None:
    """A box of any saturated hue on the road, with a glass band and a dark wheels band."""
    s, yy, xx, horizon = canvas.size, canvas.yy, canvas.xx, canvas.horizon
    w = (0.12 + 0.3 * scale) * s
    h = w * rng.uniform(0.45, 0.6)
    centre = vanish + rng.uniform(-1, 1) * (bottom - horizon) * spread * 0.8
    x0 = centre - w / 2
    mask = (xx >= x0) & (xx < x0 + w) & (yy >= bottom - h) & (yy < bottom)
    body = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.6, 0.95), rng.uniform(0.55, 0.95)))
    colour = np.broadcast_to(body, (s, s, 3)).copy()
    rel = (yy - (bottom - h)) / max(h, 1)
    colour[(rel < 0.35) & (rel > 0.08)] = np.array([0.55, 0.65, 0.75])
    colour[rel > 0.8] = np.array([0.06, 0.06, 0.07])
    canvas.paint(mask, colour, CAR)


def _draw_person(rng: np.random.Generator, canvas: _Canvas, bottom: float, scale: float) -> None:
    """A thin upright figure: skin-tone head, clothes, darker legs."""
    s, yy, xx = canvas.size, canvas.yy, canvas.xx
    h = (0.15 + 0.35 * scale) * s
    w = h * 0.28
    x0 = rng.uniform(0, 1) * s
    rel = (yy - (bottom - h)) / max(h, 1)
    body = (xx >= x0) & (xx < x0 + w) & (rel >= 0.2) & (rel < 1)
    head = np.hypot(xx - (x0 + w / 2), (yy - (bottom - h + 0.1 * h)) * 1.0) < max(w * 0.45, 1.0)
    clothes = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.3, 0.8), rng.uniform(0.2, 0.6)))
    colour = np.broadcast_to(clothes, (s, s, 3)).copy()
    colour[rel > 0.6] = clothes * 0.5
    colour[head] = np.array([0.85, 0.65, 0.5])
    canvas.paint(body | head, colour, PERSON)


def _draw_objects(rng: np.random.Generator, canvas: _Canvas, vanish: float, spread: float) -> None:
    """Poles, cars and people, drawn far to near so that nearer ones cover farther ones."""
    s, horizon = canvas.size, canvas.horizon
    objects = []
    for _ in range(rng.integers(1, 4)):
        objects.append(("pole", rng.uniform(horizon + 2, s)))
    for _ in range(rng.integers(1, 5)):
        objects.append(("car", rng.uniform(horizon + 3, s + 0.1 * s)))
    for _ in range(rng.integers(1, 4)):
        objects.append(("person", rng.uniform(horizon + 3, s + 0.05 * s)))
    for kind, bottom in sorted(objects, key=lambda o: o[1]):
        scale = (bottom - horizon) / (s - horizon)
        if kind == "pole":
            _draw_pole(rng, canvas, bottom, scale)
        elif kind == "car":
            _draw_car(rng, canvas, bottom, scale, vanish, spread)
        else:
            _draw_person(rng, canvas, bottom, scale)


def render_scene(rng: np.random.Generator, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """One source-domain scene: ``(image float32 (H, W, 3) in [0, 1], label int64 (H, W))``.

    Example:
        >>> image, label = render_scene(np.random.default_rng(0), 32)
        >>> image.shape, label.shape, sorted(set(label.ravel().tolist()))[:2]
        ((32, 32, 3), (32, 32), [0, 1])
    """
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    image = np.zeros((s, s, 3), np.float32)
    label = np.zeros((s, s), np.int64)
    canvas = _Canvas(image, label, yy, xx, size=s, horizon=int(s * rng.uniform(0.38, 0.55)))
    _draw_sky(rng, canvas)
    road, vanish, spread = _draw_ground(rng, canvas)
    _draw_buildings(rng, canvas, road)
    _draw_trees(rng, canvas, road)
    _draw_objects(rng, canvas, vanish, spread)
    image *= rng.uniform(0.9, 1.1)
    return image.clip(0, 1).astype(np.float32), label


def apply_domain(image: np.ndarray, label: np.ndarray, domain: str, rng: np.random.Generator) -> np.ndarray:
    """Applies a target domain's appearance shift to a source image (labels unchanged).

    Example:
        >>> image, label = render_scene(np.random.default_rng(0), 32)
        >>> night = apply_domain(image, label, "night", np.random.default_rng(1))
        >>> bool(night.mean() < image.mean())
        True
    """
    if domain == "source":
        return image
    s = image.shape[0]
    if domain == "fog":
        rows = np.arange(s, dtype=np.float32)
        horizon = int(np.argmax((label != SKY).any(axis=1))) if (label != SKY).any() else s // 2
        distance = np.abs(rows - horizon) / s
        transmission = np.clip(0.15 + 1.6 * distance, 0.15, 0.75)[:, None, None]
        haze = np.array([0.82, 0.84, 0.86]) * rng.uniform(0.9, 1.05)
        out = image * transmission + haze * (1 - transmission)
    elif domain == "night":
        out = (image ** 1.8) * 0.4 * np.array([0.75, 0.85, 1.25]) + rng.normal(0, 0.025, image.shape)
    elif domain == "noise":
        out = image + rng.normal(0, 0.13, image.shape)
    elif domain == "colour":
        angle = rng.uniform(0.6, 0.9) * np.pi  # hue rotation about the grey axis
        k = np.ones(3) / np.sqrt(3)
        cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        rotation = np.cos(angle) * np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * np.outer(k, k)
        out = image @ rotation.T
        grey = out.mean(-1, keepdims=True)
        out = grey + (out - grey) * 1.3
    else:
        raise ValueError(f"unknown synthetic domain {domain!r}; choose from {DOMAINS}")
    return np.clip(out, 0, 1).astype(np.float32)


class SyntheticScenes(Dataset):
    """A synthetic domain: ``num_images`` scenes of ``size`` x ``size`` in ``domain``.

    Scene ``i`` is generated from ``(seed, i)`` only, so every domain shows the same
    scenes. Samples are cached after their first generation.

    Args:
        domain: One of :data:`DOMAINS`.
        num_images: Number of scenes.
        size: Image side in pixels.
        seed: Scene seed (use different seeds for training and evaluation sets).
        transform: Optional transform, called as ``transform(sample, rng=...)``.

    Example:
        >>> data = SyntheticScenes("fog", num_images=2, size=32)
        >>> sample = data[0]
        >>> sample["image"].dtype, sample["image"].shape, sample["label"].max().item() < 7
        (torch.uint8, torch.Size([3, 32, 32]), True)
    """

    classes = SYNTHETIC_CLASSES

    def __init__(self, domain: str = "source", num_images: int = 64, size: int = 96, seed: int = 0,
                 transform: Callable | None = None) -> None:
        if domain not in DOMAINS:
            raise ValueError(f"unknown synthetic domain {domain!r}; choose from {DOMAINS}")
        self.domain, self.num_images, self.size, self.seed = domain, int(num_images), int(size), int(seed)
        self.transform = transform
        self._cache: dict[int, dict[str, Any]] = {}
        self._domain_key = zlib.crc32(domain.encode())

    def __len__(self) -> int:
        return self.num_images

    def load(self, index: int) -> dict[str, Any]:
        """The raw sample ``index`` (uint8 image, int64 label)."""
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        if index not in self._cache:
            image, label = render_scene(np.random.default_rng([self.seed, index]), self.size)
            image = apply_domain(image, label, self.domain, np.random.default_rng([self.seed, index, self._domain_key]))
            self._cache[index] = {
                "image": torch.from_numpy((image * 255 + 0.5).astype(np.uint8)).permute(2, 0, 1).contiguous(),
                "label": torch.from_numpy(label),
                "path": f"synthetic://{self.domain}/{self.seed}/{index}",
            }
        return dict(self._cache[index])

    def get(self, index: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
        sample = self.load(index)
        return self.transform(sample, rng=rng) if self.transform is not None else sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index)

    def __repr__(self) -> str:
        return f"SyntheticScenes(domain={self.domain!r}, num_images={self.num_images}, size={self.size}, seed={self.seed})"
