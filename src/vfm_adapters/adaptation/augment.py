"""Photometric augmentations on batches of ``[0, 1]`` images, in plain torch.

DACS's strong augmentation after ClassMix (colour jitter 0.2 with p = 0.8, Gaussian
blur with p = 0.5 and sigma in 0.15-1.15, a kernel of about a tenth of the image) and
the colour augmentation of the self-training student use these. Every random choice is
drawn from an explicit ``torch.Generator`` so steps are reproducible from a seed.

The jitter follows torchvision's ``ColorJitter`` semantics (factors drawn uniformly in
``[1 - s, 1 + s]`` for brightness/contrast/saturation and ``[-h, h]`` for hue, applied in
a random order per image). Brightness, contrast, hue and the blur are torchvision's
kernels (``torchvision.transforms.v2.functional``), measured within 2e-5 of the plain
torch formulas they replaced (tests/test_augment.py); saturation stays plain torch
(its grey weights differ from torchvision's, 0.299 vs 0.2989, by 2.0e-5).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_GRAY = (0.299, 0.587, 0.114)


def _functional():
    """``torchvision.transforms.v2.functional``, imported on first use (it takes ~1 s to import)."""
    import torchvision.transforms.v2.functional as functional

    return functional


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _grayscale(image: Tensor) -> Tensor:
    weights = torch.tensor(_GRAY, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * weights).sum(0, keepdim=True)


def adjust_brightness(image: Tensor, factor: float) -> Tensor:
    """``image * factor`` clamped to [0, 1] (one ``(3, H, W)`` image)."""
    return _functional().adjust_brightness(image, factor)


def adjust_contrast(image: Tensor, factor: float) -> Tensor:
    """Blend with the mean grey level: ``mean + factor * (image - mean)``, clamped."""
    return _functional().adjust_contrast(image, factor)


def adjust_saturation(image: Tensor, factor: float) -> Tensor:
    """Blend with the greyscale image: ``gray + factor * (image - gray)``, clamped."""
    gray = _grayscale(image)
    return (gray + factor * (image - gray)).clamp(0, 1)


def adjust_hue(image: Tensor, shift: float) -> Tensor:
    """Rotate the hue by ``shift`` turns (in [-0.5, 0.5])."""
    return _functional().adjust_hue(image.clamp(0, 1), shift)


def color_jitter(
    images: Tensor,
    strength: float = 0.2,
    hue: float | None = None,
    p: float = 0.8,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random brightness, contrast, saturation and hue changes of ``[0, 1]`` images.

    With probability ``p`` (one draw per batch, as DACS) every image gets its own
    factors in ``[1 - strength, 1 + strength]`` and a hue shift in ``[-hue, hue]``
    (``hue`` defaults to ``strength``: DACS jitters all four by 0.2), in a random order.

    Args:
        images: ``(B, 3, H, W)`` floats in [0, 1].
        strength: Brightness/contrast/saturation range.
        hue: Hue range in turns (default ``strength``).
        p: Probability of jittering the batch.
        generator: Source of randomness.

    Returns:
        The jittered images (a new tensor).

    Example:
        >>> x = torch.rand(2, 3, 8, 8)
        >>> torch.equal(color_jitter(x, p=0.0), x)
        True
        >>> y = color_jitter(x, p=1.0, generator=torch.Generator().manual_seed(0))
        >>> y.shape, bool((y - x).abs().max() > 0), bool(y.min() >= 0 and y.max() <= 1)
        (torch.Size([2, 3, 8, 8]), True, True)
    """
    hue = strength if hue is None else hue
    if float(torch.rand((), generator=generator)) >= p:
        return images.clone()
    out = []
    for image in images:
        order = torch.randperm(4, generator=generator).tolist()
        factors = [_uniform(max(0.0, 1 - strength), 1 + strength, generator) for _ in range(3)]
        shift = _uniform(-hue, hue, generator)
        for op in order:
            if op == 0:
                image = adjust_brightness(image, factors[0])
            elif op == 1:
                image = adjust_contrast(image, factors[1])
            elif op == 2:
                image = adjust_saturation(image, factors[2])
            elif hue > 0:
                image = adjust_hue(image, shift)
        out.append(image)
    return torch.stack(out)


def dacs_kernel_size(size: int) -> int:
    """DACS's blur kernel for an image side: ``floor(ceil(0.1 s) - 0.5 + ceil(0.1 s) % 2)`` (always odd).

    Example:
        >>> dacs_kernel_size(512), dacs_kernel_size(505), dacs_kernel_size(16)
        (51, 51, 1)
    """
    tenth = math.ceil(0.1 * size)
    return int(math.floor(tenth - 0.5 + tenth % 2))


def blur(images: Tensor, sigma: float, kernel_size: tuple[int, int]) -> Tensor:
    """Gaussian blur with reflect padding (``kernel_size`` = (height, width), odd), torchvision's kernel.

    Example:
        >>> x = torch.zeros(1, 3, 9, 9); x[..., 4, 4] = 1.0
        >>> y = blur(x, 1.0, (5, 5))
        >>> round(float(y.sum()), 4), bool(y[..., 4, 4].max() < 1)
        (3.0, True)
    """
    ky, kx = kernel_size
    return _functional().gaussian_blur(images, [kx, ky], [sigma, sigma])  # torchvision takes (width, height)


def gaussian_blur(
    images: Tensor,
    p: float = 0.5,
    sigma: tuple[float, float] = (0.15, 1.15),
    generator: torch.Generator | None = None,
) -> Tensor:
    """DACS's random blur: with probability ``p`` blur the batch with one sigma in ``sigma``.

    The kernel is :func:`dacs_kernel_size` of each side (51 for 512 pixels).

    Example:
        >>> x = torch.rand(1, 3, 32, 32)
        >>> torch.equal(gaussian_blur(x, p=0.0), x)
        True
        >>> bool(gaussian_blur(x, p=1.0).std() < x.std())
        True
    """
    if float(torch.rand((), generator=generator)) >= p:
        return images.clone()
    s = _uniform(sigma[0], sigma[1], generator)
    size = (dacs_kernel_size(images.shape[-2]), dacs_kernel_size(images.shape[-1]))
    size = tuple(min(k, 2 * ((n - 1) // 2) + 1) for k, n in zip(size, images.shape[-2:]))  # reflect pad < side
    return blur(images, s, size)


def denormalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Normalised images -> ``[0, 1]`` (``mean``/``std`` on the 0..255 scale)."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * s + m) / 255.0


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``[0, 1]`` images -> normalised (``mean``/``std`` on the 0..255 scale).

    Example:
        >>> x = torch.rand(1, 3, 4, 4)
        >>> m, s = (10.0, 20.0, 30.0), (2.0, 3.0, 4.0)
        >>> torch.allclose(denormalize(normalize(x, m, s), m, s), x, atol=1e-6)
        True
    """
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * 255.0 - m) / s
