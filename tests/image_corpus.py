"""A generated corpus of encoded images covering every decoder case (tests of the one image decoder).

Each entry is ``name -> encoded bytes``: 8-bit PNG (gray, gray+alpha, RGB, RGBA,
palette with and without transparency, 1-bit), 16-bit PNG (gray, gray+alpha,
RGB, RGBA; written by hand, PIL cannot write them all), JPEG (gray, RGB at
4:4:4 and 4:2:0), BMP, GIF and WebP (lossless and lossy). The pixels are smooth
gradients plus noise, so resizes and JPEG blocks see realistic content.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 37, 53


def _content(channels: int, seed: int, dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    top = 65535 if dtype == np.uint16 else 255
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = (yy / HEIGHT + xx / WIDTH) / 2.0
    planes = [np.clip(base * (0.5 + 0.5 * c) + rng.normal(0, 0.08, base.shape), 0, 1) for c in range(channels)]
    return np.round(np.stack(planes, -1) * top).astype(dtype)


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **options) -> bytes:
    """``array`` ([h, w] or [h, w, c] uint8) encoded by PIL as ``fmt`` (after ``convert(mode)`` when given)."""
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG (colour type 0, 4, 2 or 6 for 1-4 channels) of ``uint16 [h, w, c]``."""
    height, width, channels = array.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = array.astype(">u2").reshape(height, width * channels)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _palette_png(transparent: bool) -> bytes:
    image = Image.fromarray(_content(3, 7)).quantize(colors=23)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **({"transparency": 3} if transparent else {}))
    return buffer.getvalue()


def corpus() -> dict[str, bytes]:
    """Every case of the decoder, ``name -> bytes`` (deterministic)."""
    gray, rgb = _content(1, 1), _content(3, 2)
    return {
        "png8_gray": encode(gray, "PNG"),
        "png8_gray_alpha": _la_png(),
        "png8_rgb": encode(rgb, "PNG"),
        "png8_rgba": encode(_content(4, 4), "PNG"),
        "png8_palette": _palette_png(False),
        "png8_palette_trns": _palette_png(True),
        "png1_bilevel": encode(gray, "PNG", "1"),
        "png16_gray": png16(_content(1, 5, np.uint16)),
        "png16_gray_alpha": png16(_content(2, 6, np.uint16)),
        "png16_rgb": png16(_content(3, 8, np.uint16)),
        "png16_rgba": png16(_content(4, 9, np.uint16)),
        "jpeg_gray": encode(gray, "JPEG", quality=90),
        "jpeg_rgb444": encode(rgb, "JPEG", quality=90, subsampling=0),
        "jpeg_rgb420": encode(rgb, "JPEG", quality=75, subsampling=2),
        "bmp_rgb": encode(rgb, "BMP"),
        "gif_palette": encode(rgb, "GIF"),
        "webp_lossless": encode(rgb, "WEBP", lossless=True),
        "webp_lossy": encode(rgb, "WEBP", quality=80),
    }


def _la_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_content(2, 3), "LA").save(buffer, "PNG")
    return buffer.getvalue()


#: Output sizes: downsampling, upsampling, the file's own size (identity) and mixed.
SIZES = ((28, 28), (45, 61), (HEIGHT, WIDTH), (13, 90))
