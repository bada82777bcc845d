"""Reading (and, for tests, writing) 16-bit PNG files without OpenCV.

Pillow opens 16-bit-per-channel RGB PNGs as 8-bit RGB by keeping only the high byte of
every sample, so a SYNTHIA label holding class 10 in a 16-bit channel reads back as 0.
:func:`read_png` therefore decodes such files itself: with ``torchvision.io.decode_png``
when torchvision is installed (fast, returns ``uint16``), otherwise with a small
pure-numpy decoder (zlib + the five PNG scanline filters). Every other PNG goes
through Pillow.

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
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel (palette excluded)


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


def _unfilter(data: bytes, height: int, width: int, bpp: int) -> np.ndarray:
    stride = width * bpp
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size != height * (stride + 1):
        raise ValueError(f"PNG data has {raw.size} bytes, expected {height * (stride + 1)}")
    rows = raw.reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    previous = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        kind, line = rows[y, 0], rows[y, 1:]
        if kind == 0:
            current = line.copy()
        elif kind == 1:  # Sub: running sum along each byte lane (mod 256)
            lanes = line.reshape(width, bpp).astype(np.uint64)
            current = (np.cumsum(lanes, axis=0) % 256).astype(np.uint8).reshape(-1)
        elif kind == 2:  # Up
            current = line + previous
        elif kind in (3, 4):  # Average / Paeth depend on the reconstructed left pixel
            current = np.zeros(stride, dtype=np.uint8)
            up = previous.reshape(width, bpp).astype(np.int32)
            filt = line.reshape(width, bpp).astype(np.int32)
            left = np.zeros(bpp, dtype=np.int32)
            upleft = np.zeros(bpp, dtype=np.int32)
            cur = current.reshape(width, bpp)
            for x in range(width):
                b = up[x]
                if kind == 3:
                    value = (filt[x] + (left + b) // 2) & 0xFF
                else:
                    p = left + b - upleft
                    pa, pb, pc = np.abs(p - left), np.abs(p - b), np.abs(p - upleft)
                    predictor = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, b, upleft))
                    value = (filt[x] + predictor) & 0xFF
                cur[x] = value
                left, upleft = value, b
        else:
            raise ValueError(f"unknown PNG filter type {kind}")
        out[y] = current
        previous = current
    return out


def decode_png_numpy(path: str | os.PathLike) -> np.ndarray:
    """Decodes a non-interlaced 8- or 16-bit grey/RGB(A) PNG with numpy only.

    Returns:
        ``(H, W, C)`` array of ``uint8`` or ``uint16`` (C = 1, 2, 3 or 4).
    """
    data = Path(path).read_bytes()
    if data[:8] != _SIGNATURE:
        raise ValueError(f"{path} is not a PNG file")
    position, idat, header = 8, [], None
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        position += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError(f"{path} has no IHDR chunk")
    width, height, depth, colour, _, _, interlace = header
    if interlace or colour not in _CHANNELS or depth not in (8, 16):
        raise ValueError(f"{path}: only non-interlaced 8/16-bit grey or RGB(A) PNGs are supported by the numpy decoder")
    channels = _CHANNELS[colour]
    bpp = channels * depth // 8
    check_pixel_limit(path, width, height)
    expected = height * (width * bpp + 1)  # decompress no more than the image can hold (a zlib bomb)
    pixels = _unfilter(zlib.decompressobj().decompress(b"".join(idat), expected + 1), height, width, bpp)
    if depth == 16:
        array = pixels.reshape(height, width * channels, 2)
        values = (array[..., 0].astype(np.uint16) << 8) | array[..., 1].astype(np.uint16)
        return values.reshape(height, width, channels)
    return pixels.reshape(height, width, channels)


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Reads any PNG at full bit depth as ``(H, W)`` or ``(H, W, C)``.

    16-bit colour PNGs (which Pillow would truncate to their high byte) are decoded by
    torchvision when available, else by :func:`decode_png_numpy`; everything else by
    Pillow (palette images give their indices, as label maps need).

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
        try:
            import warnings

            import torch

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                from torchvision.io import ImageReadMode, decode_png

            raw = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                decoded = decode_png(raw, mode=ImageReadMode.UNCHANGED)
            return decoded.permute(1, 2, 0).numpy().astype(np.uint16)
        except Exception:  # torchvision missing or too old for 16-bit output (or a damaged file: named below)
            with naming_errors(path):
                return decode_png_numpy(path)
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
