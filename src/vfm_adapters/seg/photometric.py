"""mmseg's photometric distortion (brightness, contrast, saturation, hue) and the HSV conversions it needs.

A transform of :mod:`vfm_adapters.seg.transforms` (``transform(sample, rng=generator)``)
that changes the image only; the label is untouched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["PhotoMetricDistortion", "hsv_to_rgb", "rgb_to_hsv"]

Sample = dict[str, Any]


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn)."""
    r, g, b = rgb.unbind(0)
    maximum, _ = rgb.max(0)
    minimum, _ = rgb.min(0)
    delta = maximum - minimum
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(maximum == r, ((g - b) / safe) % 6, torch.where(maximum == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    saturation = torch.where(maximum > 0, delta / torch.where(maximum > 0, maximum, torch.ones_like(maximum)), torch.zeros_like(maximum))
    return torch.stack([hue, saturation, maximum])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`.

    Example:
        >>> x = torch.rand(3, 4, 4)
        >>> torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)
        True
    """
    hue, saturation, value = hsv.unbind(0)
    k = lambda n: (n + hue * 6) % 6  # noqa: E731
    f = lambda n: value - value * saturation * torch.clamp(torch.minimum(k(n), 4 - k(n)), 0, 1)  # noqa: E731
    return torch.stack([f(5), f(3), f(1)])


class PhotoMetricDistortion:
    """mmseg's photometric distortion: brightness, contrast, saturation, hue (each p = 0.5).

    Brightness adds a delta in ±32 (0..255 scale), contrast and saturation scale by
    0.5-1.5; contrast comes before or after the HSV steps at random. The hue shift is
    an integer drawn from ``[-hue_delta, hue_delta)`` on a hue circle of
    ``hue_scale`` units: mmseg works on OpenCV's uint8 HSV, whose hue runs 0..180, so
    its ``hue_delta=18`` is ±36 degrees (the default here). The label is untouched.
    Output is ``float32`` on the 0..255 scale, clipped after every step.
    """

    def __init__(self, brightness_delta: float = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18,
                 hue_scale: float = 180.0) -> None:
        self.brightness_delta, self.contrast_range = brightness_delta, contrast_range
        self.saturation_range, self.hue_delta, self.hue_scale = saturation_range, int(hue_delta), float(hue_scale)

    def hue_shift_degrees(self, rng: np.random.Generator) -> float:
        """One hue shift in degrees, as mmseg draws it (``randint(-delta, delta)`` on the hue scale)."""
        return float(rng.integers(-self.hue_delta, self.hue_delta)) * 360.0 / self.hue_scale if self.hue_delta else 0.0

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = rng if rng is not None else np.random.default_rng()
        image = sample["image"].float()
        if rng.integers(2):
            image = (image + float(rng.uniform(-self.brightness_delta, self.brightness_delta))).clamp(0, 255)
        contrast_first = bool(rng.integers(2))

        def contrast(x: torch.Tensor) -> torch.Tensor:
            return (x * float(rng.uniform(*self.contrast_range))).clamp(0, 255) if rng.integers(2) else x

        if contrast_first:
            image = contrast(image)
        do_saturation, do_hue = bool(rng.integers(2)), bool(rng.integers(2))
        saturation = float(rng.uniform(*self.saturation_range))
        hue = self.hue_shift_degrees(rng)
        if do_saturation or do_hue:
            hsv = rgb_to_hsv(image.clamp(0, 255) / 255.0)
            if do_saturation:
                hsv[1] = (hsv[1] * saturation).clamp(0, 1)
            if do_hue:
                hsv[0] = (hsv[0] + hue / 360.0) % 1.0
            image = hsv_to_rgb(hsv) * 255.0
        if not contrast_first:
            image = contrast(image)
        out = dict(sample)
        out["image"] = image.clamp(0, 255)
        return out

    def __repr__(self) -> str:
        return f"PhotoMetricDistortion(hue_delta={self.hue_delta}, hue_scale={self.hue_scale})"
