"""Reading (and, for tests, writing) 16-bit PNG files without OpenCV.

Pillow opens 16-bit-per-channel RGB PNGs as 8-bit RGB by keeping only the high byte of
every sample, so a SYNTHIA label holding class 10 in a 16-bit channel reads back as 0.
:func:`read_png` therefore decodes such files with ``torchvision.io.decode_png``
(torchvision comes with timm; it returns ``uint16``). Every other PNG goes through
Pillow.

Every reader here opens regular files only (a FIFO named ``*.png`` would block forever),
applies Pillow's decompression-bomb pixel limit (``PIL.Image.MAX_IMAGE_PIXELS``) to the
16-bit path too, and names the file in any decoding error (e.g. a truncated file).
:func:`read_rgb` converts 16-bit images to 8 bits by scaling (``round(v / 257)``)
rather than letting Pillow clip them to white.
"""

from __future__ import annotations

import os
import stat
import struct
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageReadError(OSError):
    """An image or label file that cannot be read (not a regular file, truncated, corrupt); names the file."""


def require_regular_file(path: str | os.PathLike) -> None:
    """Refuses anything but a regular file (or a link to one) before it is opened.

    Example:
        >>> import tempfile
        >>> require_regular_file(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        vfm_adapters.seg._png.ImageReadError: ... is not a regular file ...
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ImageReadError(f"{path} is not a regular file (a directory, FIFO, socket or device); image and label "
                             "files must be regular files")


def check_pixel_limit(path: str | os.PathLike, width: int, height: int) -> None:
    """Pillow's decompression-bomb rule for a file decoded without Pillow: a warning above
    ``PIL.Image.MAX_IMAGE_PIXELS``, an error above twice that (``None`` disables it)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is None:
        return
    pixels = int(width) * int(height)
    if pixels > 2 * limit:
        raise Image.DecompressionBombError(
            f"{path}: {width}x{height} = {pixels} pixels exceeds twice PIL.Image.MAX_IMAGE_PIXELS ({limit}), a possible "
            "decompression bomb; raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted")
    if pixels > limit:
        warnings.warn(f"{path}: {pixels} pixels exceeds PIL.Image.MAX_IMAGE_PIXELS ({limit}), a possible "
                      "decompression bomb", Image.DecompressionBombWarning, stacklevel=3)


@contextmanager
def naming_errors(path: str | os.PathLike) -> Iterator[None]:
    """Re-raises a decoder's error (e.g. Pillow's "image file is truncated") as :class:`ImageReadError` naming ``path``."""
    from PIL import Image

    try:
        yield
    except (ImageReadError, FileNotFoundError, Image.DecompressionBombError):
        raise
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error, RuntimeError) as error:
        raise ImageReadError(f"cannot read {path}: {error}") from error


def png_header(path: str | os.PathLike) -> dict[str, int]:
    """Width, height, bit depth and colour type from a PNG's IHDR chunk.

    Example:
        >>> import tempfile, numpy as np, os
        >>> path = os.path.join(tempfile.mkdtemp(), "x.png")
        >>> write_png16(path, np.zeros((2, 3, 3), dtype=np.uint16))
        >>> png_header(path)["bit_depth"]
        16
    """
    require_regular_file(path)
    with open(path, "rb") as stream:
        head = stream.read(33)
    if len(head) < 33 or head[:8] != _SIGNATURE or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", head[16:29])
    return {"width": width, "height": height, "bit_depth": depth, "colour_type": colour, "interlace": interlace}


def _decode_png16(path: str | os.PathLike) -> np.ndarray:
    """A 16-bit PNG as ``(H, W, C)`` ``uint16``, decoded by torchvision (libpng).

    libpng inflates the image data row by row into a buffer of the header's size, so the
    caller's pixel limit on the header also bounds the memory a zlib bomb could claim.
    torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec (not a
    dependency here); that warning is silenced, and the tests pin the decoded values.
    """
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_png

        raw = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
        decoded = decode_png(raw, mode=ImageReadMode.UNCHANGED)
    return decoded.permute(1, 2, 0).numpy().astype(np.uint16, copy=False)


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Reads any PNG at full bit depth as ``(H, W)`` or ``(H, W, C)``.

    16-bit colour PNGs (which Pillow would truncate to their high byte) are decoded by
    torchvision; everything else by Pillow (palette images give their indices, as label
    maps need).

    Example:
        >>> import tempfile, numpy as np, os
        >>> path = os.path.join(tempfile.mkdtemp(), "x.png")
        >>> write_png16(path, np.full((2, 3, 3), 300, dtype=np.uint16))
        >>> read_png(path)[0, 0].tolist()
        [300, 300, 300]
    """
    header = png_header(path)
    if header["bit_depth"] == 16 and header["colour_type"] in (2, 4, 6):
        check_pixel_limit(path, header["width"], header["height"])
        with naming_errors(path):
            return _decode_png16(path)
    from PIL import Image

    with naming_errors(path), Image.open(path) as image:
        return np.asarray(image)


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _to_rgb8(array: np.ndarray) -> np.ndarray:
    """``(H, W[, C])`` uint8/uint16 -> ``(H, W, 3)`` uint8: 16-bit values scaled (not clipped), grey repeated, alpha dropped."""
    if array.dtype == np.uint16:
        array = ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    channels = array.shape[2]
    if channels in (1, 2):
        array = np.repeat(array[..., :1], 3, axis=2)
    elif channels == 4:
        array = array[..., :3]
    return np.ascontiguousarray(array)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as ``(H, W, 3)`` ``uint8`` RGB.

    8-bit files go through Pillow; 16-bit PNGs (grey or colour) and 16-bit grey files
    of other formats are scaled to 8 bits (``round(v / 257)``), where Pillow would clip
    grey values above 255 to white; 32-bit integer or float images are refused.

    Raises:
        ImageReadError: Not a regular file, unsupported mode, or a damaged file (the
            message names it).
        PIL.Image.DecompressionBombError: More than twice ``MAX_IMAGE_PIXELS`` pixels.

    Example:
        >>> import tempfile, numpy as np, os
        >>> path = os.path.join(tempfile.mkdtemp(), "x.png")
        >>> write_png16(path, np.full((2, 3), 30000, dtype=np.uint16))
        >>> read_rgb(path)[0, 0].tolist()
        [117, 117, 117]
    """
    from PIL import Image

    require_regular_file(path)
    with naming_errors(path):
        with open(path, "rb") as stream:
            is_png = stream.read(8) == _SIGNATURE
        if is_png and png_header(path)["bit_depth"] == 16:
            return _to_rgb8(read_png(path))
        with Image.open(path) as image:
            if image.mode in _SIXTEEN_BIT_MODES:
                return _to_rgb8(np.asarray(image).astype(np.uint16))
            if image.mode in ("I", "F"):
                raise ImageReadError(f"{path} is a 32-bit {'float' if image.mode == 'F' else 'integer'} image; "
                                     "input images must be 8- or 16-bit")
            return np.asarray(image.convert("RGB"))


def write_png16(path: str | os.PathLike, array: np.ndarray, filters: tuple[int, ...] = (0,)) -> None:
    """Writes a 16-bit grey ``(H, W)``/``(H, W, 1)`` or RGB ``(H, W, 3)`` PNG.

    Used by tests to create SYNTHIA-style labels (Pillow cannot write 16-bit RGB).
    ``filters`` lists the scanline filter types to cycle through, row by row, so that
    a reader's handling of every filter can be exercised.
    """
    array = np.asarray(array, dtype=np.uint16)
    if array.ndim == 2:
        array = array[..., None]
    height, width, channels = array.shape
    colour = {1: 0, 3: 2, 4: 6}[channels]
    bpp = channels * 2
    raw_rows = array.astype(">u2").reshape(height, width * channels).view(np.uint8).reshape(height, width * bpp)
    lines, previous = [], np.zeros(width * bpp, dtype=np.int32)
    for y in range(height):
        kind = filters[y % len(filters)]
        row = raw_rows[y].astype(np.int32)
        left = np.concatenate([np.zeros(bpp, dtype=np.int32), row[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, dtype=np.int32), previous[:-bpp]])
        if kind == 0:
            filtered = row
        elif kind == 1:
            filtered = row - left
        elif kind == 2:
            filtered = row - previous
        elif kind == 3:
            filtered = row - (left + previous) // 2
        elif kind == 4:
            p = left + previous - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - previous), np.abs(p - upleft)
            filtered = row - np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, previous, upleft))
        else:
            raise ValueError(f"unknown PNG filter type {kind}")
        lines.append(bytes([kind]) + (filtered & 0xFF).astype(np.uint8).tobytes())
        previous = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    payload = _SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(lines))) + chunk(b"IEND", b"")
    Path(path).write_bytes(payload)
