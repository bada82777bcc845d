"""The torchvision kernels in adaptation/augment.py equal the plain torch formulas they replaced (within 2e-5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vfm_adapters.adaptation import augment
from vfm_adapters.seg.transforms import hsv_to_rgb, rgb_to_hsv

TOLERANCE = 2e-5
GRAY = torch.tensor((0.299, 0.587, 0.114)).view(3, 1, 1)


def images(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0))


def plain_contrast(image, factor):
    mean = (image * GRAY).sum(0, keepdim=True).mean()
    return (mean + factor * (image - mean)).clamp(0, 1)


def plain_hue(image, shift):
    hsv = rgb_to_hsv(image.clamp(0, 1))
    hsv[0] = (hsv[0] + shift) % 1.0
    return hsv_to_rgb(hsv).clamp(0, 1)


def plain_blur(batch, sigma, kernel_size):
    def kernel(size):
        coords = torch.arange(size, dtype=batch.dtype) - (size - 1) / 2
        weights = torch.exp(-(coords**2) / (2 * sigma**2))
        return weights / weights.sum()

    (ky, kx), channels, out = kernel_size, batch.shape[1], batch
    if ky > 1:
        out = F.conv2d(F.pad(out, (0, 0, ky // 2, ky // 2), mode="reflect"),
                       kernel(ky).view(1, 1, ky, 1).repeat(channels, 1, 1, 1), groups=channels)
    if kx > 1:
        out = F.conv2d(F.pad(out, (kx // 2, kx // 2, 0, 0), mode="reflect"),
                       kernel(kx).view(1, 1, 1, kx).repeat(channels, 1, 1, 1), groups=channels)
    return out


@pytest.mark.parametrize("factor", [0.8, 1.0, 1.2])
def test_brightness_and_contrast_match_the_plain_formulas(factor):
    for image in images(4, 3, 24, 32):
        assert torch.equal(augment.adjust_brightness(image, factor), (image * factor).clamp(0, 1))
        assert (augment.adjust_contrast(image, factor) - plain_contrast(image, factor)).abs().max() <= TOLERANCE


@pytest.mark.parametrize("shift", [-0.2, 0.05, 0.2])
def test_hue_matches_the_hsv_rotation(shift):
    for image in images(4, 3, 24, 32):
        assert (augment.adjust_hue(image, shift) - plain_hue(image, shift)).abs().max() <= TOLERANCE


@pytest.mark.parametrize("sigma", [0.15, 0.6, 1.15])
@pytest.mark.parametrize("kernel_size", [(1, 1), (1, 5), (7, 9), (51, 51)])
def test_blur_matches_the_separable_reflect_padded_blur(sigma, kernel_size):
    batch = images(2, 3, 64, 64)
    blurred = augment.blur(batch, sigma, kernel_size)
    assert blurred.shape == batch.shape
    assert (blurred - plain_blur(batch, sigma, kernel_size)).abs().max() <= TOLERANCE


def test_dacs_blur_keeps_its_kernel_rule_and_mean():
    batch = images(1, 3, 40, 30)
    out = augment.gaussian_blur(batch, p=1.0, generator=torch.Generator().manual_seed(1))
    assert math.isclose(float(out.mean()), float(batch.mean()), abs_tol=1e-2) and out.std() < batch.std()
