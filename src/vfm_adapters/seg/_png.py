"""Reading (and, for tests, writing) 16-bit PNG files without OpenCV.

Pillow opens 16-bit-per-channel RGB PNGs as 8-bit RGB by keeping only the high byte of
every sample, so a SYNTHIA label holding class 10 in a 16-bit channel reads back as 0.
:func:`read_png` therefore decodes such files itself: with ``torchvision.io.decode_png``
when torchvision is installed (fast, returns ``uint16``), otherwise with a small
pure-numpy decoder (zlib + the five PNG scanline filters). Every other PNG goes
through Pillow.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel (palette excluded)


def png_header(path: str | os.PathLike) -> dict[str, int]:
    """Width, height, bit depth and colour type from a PNG's IHDR chunk.

    Example:
        >>> import tempfile, numpy as np, os
        >>> path = os.path.join(tempfile.mkdtemp(), "x.png")
        >>> write_png16(path, np.zeros((2, 3, 3), dtype=np.uint16))
        >>> png_header(path)["bit_depth"]
        16
    """
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
    pixels = _unfilter(zlib.decompress(b"".join(idat)), height, width, bpp)
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
        except Exception:  # torchvision missing or too old for 16-bit output
            return decode_png_numpy(path)
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image)


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
