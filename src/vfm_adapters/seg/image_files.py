"""Reading one image or label file as the dataset readers return it.

Images come back as ``uint8`` ``(3, H, W)`` RGB tensors, labels as integer ``(H, W)``
arrays of the stored ids (converted to train ids by the reader's table, see
:mod:`vfm_adapters.seg.label_maps`). The decoding itself, 16-bit PNGs included, is in
``seg._png``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from ._png import naming_errors, read_png, read_rgb, require_regular_file

__all__ = ["image_size", "read_image", "read_label"]


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Reads an image file as a ``uint8`` ``(3, H, W)`` RGB tensor (16-bit files scaled, see :func:`._png.read_rgb`)."""
    return torch.from_numpy(read_rgb(path).copy()).permute(2, 0, 1).contiguous()


def read_label(path: str | os.PathLike, channel: int | None = None) -> np.ndarray:
    """Reads a label map as an integer ``(H, W)`` array of stored ids.

    Palette PNGs give their indices (GTA5 and Mapillary store ids that way), 16-bit PNGs
    keep their full values. ``channel`` picks one channel of a multi-channel label.
    """
    if str(path).lower().endswith(".png"):
        array = read_png(path)
    else:
        require_regular_file(path)
        with naming_errors(path), Image.open(path) as image:
            array = np.asarray(image)
    if array.ndim == 3:
        if channel is None:
            raise ValueError(f"{path} is a {array.shape[2]}-channel label map; colour-coded labels are not supported")
        array = array[..., channel]
    return array.astype(np.int64)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file, reading only its header."""
    require_regular_file(path)
    with naming_errors(path), Image.open(path) as image:
        width, height = image.size
    return height, width
