"""The one image decoder of the package: encoded bytes to the pixels the model takes, with numpy and PIL.

Training (:mod:`detreg_keras.data`), the SavedModel's in-graph decoder
(:func:`detreg_keras.export.decode_image_tensor`) and this module decode an
image file alike: this module reproduces ``tf.io.decode_image(dtype=uint8)``
followed by ``tf.image.resize(method="bilinear", antialias=True)`` without
TensorFlow, so the serving runtime needs only numpy, PIL and simplejpeg.

Decoding (:func:`decode_native`) gives ``uint8 [h, w, c]`` with the file's own
channels, as ``tf.io.decode_image(channels=0)`` does:

* JPEG: libjpeg-turbo through simplejpeg with TensorFlow's defaults (the fast
  integer DCT, ``dct_method="INTEGER_FAST"``, and fancy upsampling); PIL would use
  the accurate DCT and differ by up to 6 levels;
* PNG: 8-bit as stored; 16-bit reduced to 8 bits by keeping the high byte (as
  libpng's ``png_set_strip_16`` in TensorFlow: a 16-bit ramp keeps its mean
  127.5, where PIL's ``convert("L")`` clips it to 251); 1/2/4-bit gray expanded
  to 0-255; palette expanded to RGB (RGBA with transparency);
* BMP, GIF (first frame), WebP: PIL.

:func:`to_model_pixels` then makes ``float32 [H, W, C]``: for ``C == 3`` gray is
replicated and alpha dropped (no compositing); for ``C == 1`` gray stays gray and
colour is resized first, then weighted with ``tf.image.rgb_to_grayscale``'s luma
weights. The resize (:func:`resize_bilinear_antialias`) is TensorFlow's
``ScaleAndTranslate`` kernel with a triangle filter, float32 step by step in the
same order (rows, then columns), so the pixels are bit-identical
(``tests/test_imaging.py`` checks every case against ``tf.io.decode_image``).
EXIF orientation is applied by neither.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: File extensions treated as images everywhere: training folders, index building, serving (lower case).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
#: ``tf.image.rgb_to_grayscale``'s weights (ITU-R 601-2 luma), applied after the resize.
GRAY_WEIGHTS: tuple[float, float, float] = (0.2989, 0.5870, 0.1140)
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_GRAY_TYPES = (0, 4)  # IHDR colour types gray and gray + alpha


def read_image_bytes(source, name: str | None = None) -> bytes:
    """The encoded bytes of a path, a bytes-like object or a binary file object.

    Raises:
        ValueError: the file does not exist or cannot be read, or ``source`` is of another type.
    """
    name = name or _source_name(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            return Path(source).read_bytes()
        except FileNotFoundError as err:
            raise ValueError(f"Image file not found: {name}") from err
        except OSError as err:
            raise ValueError(f"Cannot read image {name}: {err}") from err
    if hasattr(source, "read"):
        return bytes(source.read())
    raise ValueError(f"Cannot read an image from an object of type {type(source).__name__}.")


def _source_name(source) -> str:
    return "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def image_header_size(data: bytes, name: str = "<bytes>") -> tuple[int, int]:
    """``(width, height)`` from the header of encoded image bytes, without decoding the pixels.

    Raises:
        ValueError: the bytes are not an image PIL can identify.
    """
    from PIL import Image  # noqa: PLC0415

    try:
        with Image.open(io.BytesIO(data)) as image:
            return int(image.width), int(image.height)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as err:
        raise ValueError(f"Cannot decode image {name}: {type(err).__name__}: {err}") from err


def check_pixel_limit(width: int, height: int, max_pixels: int | None, name: str = "<bytes>") -> None:
    """Refuse an image whose ``width x height`` exceeds ``max_pixels`` (``None``: no limit).

    Raises:
        ValueError: the image is too large, naming its size and the limit.
    """
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(f"Image {name} is too large: {width}x{height} exceeds the limit of {max_pixels} pixels.")


def _decode_jpeg(data: bytes) -> np.ndarray:
    """libjpeg-turbo with TensorFlow's defaults: fast integer DCT, fancy upsampling."""
    import simplejpeg  # noqa: PLC0415

    colorspace = simplejpeg.decode_jpeg_header(data)[2]
    return simplejpeg.decode_jpeg(
        data, colorspace="GRAY" if colorspace == "Gray" else "RGB", fastdct=True, fastupsample=False
    )


def _pil_native(image) -> np.ndarray:
    """A PIL image as ``uint8 [h, w, c]`` with TensorFlow's native channels (1 gray, 2 gray+alpha, 3, 4)."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":  # 16-bit gray: keep the high byte (libpng png_set_strip_16)
        array = np.asarray(image, dtype=np.uint16) if mode.startswith("I;16") else np.asarray(image)
        return (array.astype(np.uint32) >> 8).astype(np.uint8)[..., None]
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    elif mode == "1":
        image = image.convert("L")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def decode_native(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded bytes to ``uint8 [h, w, c]``, ``c`` the file's channels (``tf.io.decode_image(channels=0)``).

    Raises:
        ValueError: the bytes are not a JPEG/PNG/BMP/GIF/WebP image that can be decoded.
    """
    from PIL import Image  # noqa: PLC0415

    try:
        if data.startswith(_JPEG_SIGNATURE):
            return _decode_jpeg(data)
        with Image.open(io.BytesIO(data)) as image:
            image.seek(0)  # first frame of an animation
            native = _pil_native(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"Cannot decode image {name}: {type(err).__name__}: {err}") from err
    if native.shape[-1] >= 3 and _is_gray_png(data):  # PIL opens 16-bit gray + alpha as RGBA
        native = native[..., ::3] if native.shape[-1] == 4 else native[..., :1]
    return native


def _is_gray_png(data: bytes) -> bool:
    return data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and data[25] in _PNG_GRAY_TYPES


@functools.lru_cache(maxsize=256)
def _spans(output_size: int, input_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """TensorFlow's ``ComputeSpansCore`` (triangle kernel, antialias, no translation) in float32; cached.

    Returns:
        ``(indices [output_size, span], weights [output_size, span])``: the source
        pixels of each output pixel and their normalised weights (0 past the span),
        read-only; ``None`` when the sizes are equal (the weights are then exactly
        the identity: 1 at the pixel, 0 at its neighbours).
    """
    if output_size == input_size:
        return None
    f32 = np.float32
    scale = f32(output_size) / f32(input_size)
    inv_scale = f32(1.0 / float(scale))  # double division, rounded to float, as in the kernel
    kernel_scale = max(inv_scale, f32(1.0))
    span = min(2 * int(np.ceil(kernel_scale)) + 1, input_size)
    sample = (np.arange(output_size, dtype=f32) + f32(0.5)) * inv_scale + f32(-0.0)
    start = np.clip(np.ceil(sample - kernel_scale - f32(0.5)), 0, input_size - 1).astype(np.int64)
    end = np.clip(np.floor(sample + kernel_scale - f32(0.5)), 0, input_size - 1).astype(np.int64) + 1
    source = start[:, None] + np.arange(span)[None, :]
    inside = source < end[:, None]
    position = (source.astype(f32) + f32(0.5)) - sample[:, None]
    distance = np.abs(position * (f32(1.0) / kernel_scale))
    weights = np.where(inside & (distance < f32(1.0)), f32(1.0) - distance, f32(0.0)).astype(f32)
    total = np.zeros(output_size, f32)
    for j in range(span):  # sequential float32 sum, as in the kernel
        total = total + weights[:, j]
    usable = np.abs(total) >= f32(1000.0) * np.finfo(f32).tiny
    usable &= (sample >= 0) & (sample <= input_size)
    inverse = np.where(usable, f32(1.0) / np.where(usable, total, f32(1.0)), f32(0.0)).astype(f32)
    weights = np.where(usable[:, None], weights * inverse[:, None], f32(0.0)).astype(f32)
    indices = np.minimum(source, input_size - 1)
    indices.flags.writeable = weights.flags.writeable = False
    return indices, weights


def resize_bilinear_antialias(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``tf.image.resize(image, size, "bilinear", antialias=True)`` clipped to [0, 255], bit for bit, in numpy.

    Rows first into a float32 ``[H, w, c]`` buffer, then columns, each output the
    float32 sum of weight x pixel in span order (TensorFlow's ``GatherRows`` /
    ``GatherColumns``); an axis whose size does not change is copied (TF's weights
    are then the identity). Memory: one ``[H, w, c]`` float32 buffer besides the input.

    Args:
        image: ``[h, w, c]`` uint8 (or float) pixels.
        size: ``(H, W)`` of the result.

    Returns:
        float32 ``[H, W, c]`` in [0, 255].
    """
    height, width = int(size[0]), int(size[1])
    out = _gather(image, _spans(height, image.shape[0]), axis=0)
    out = _gather(out, _spans(width, image.shape[1]), axis=1)
    return np.clip(out, 0.0, 255.0, out=out)


def _gather(image: np.ndarray, spans: tuple[np.ndarray, np.ndarray] | None, axis: int) -> np.ndarray:
    """One pass of TF's ``GatherRows`` (``axis=0``) / ``GatherColumns`` (``axis=1``): float32 sums in span order."""
    if spans is None:  # same size: the identity, exactly
        return image.astype(np.float32)
    indices, weights = spans
    shape = list(image.shape)
    shape[axis] = len(indices)
    out = np.zeros(shape, np.float32)
    for j in range(indices.shape[1]):
        taken = np.take(image, indices[:, j], axis=axis).astype(np.float32, copy=False)
        out += (weights[:, j, None, None] if axis == 0 else weights[None, :, j, None]) * taken
    return out


def to_model_pixels(native: np.ndarray, size: tuple[int, int], channels: int) -> np.ndarray:
    """Native ``uint8 [h, w, c]`` pixels to the model's float32 ``[H, W, channels]`` (see the module docstring).

    Raises:
        ValueError: ``channels`` is not 1 or 3.
    """
    if channels not in (1, 3):
        raise ValueError(f"Only 1- or 3-channel models can take image files, this one has {channels} channels.")
    if native.shape[-1] < 3:  # gray or gray + alpha
        gray = resize_bilinear_antialias(native[..., :1], size)
        return gray if channels == 1 else np.repeat(gray, 3, axis=-1)
    rgb = resize_bilinear_antialias(native[..., :3], size)
    if channels == 3:
        return rgb
    weighted = rgb * np.asarray(GRAY_WEIGHTS, np.float32)
    return ((weighted[..., 0] + weighted[..., 1]) + weighted[..., 2])[..., None]


def load_image(source, size: tuple[int, int], channels: int = 3, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file or encoded bytes to float32 ``[H, W, C]`` raw pixels in [0, 255].

    The same pixels as the training pipeline and the SavedModel's ``serving_default``
    signature (see the module docstring). JPEG/PNG/BMP/GIF/WebP; RGB
    (``channels=3``, alpha dropped) or grayscale (``channels=1``), resized to
    ``size = (H, W)`` with an antialiased bilinear filter.

    Args:
        source: a path, encoded bytes or a binary file object.
        size: ``(H, W)`` of the result.
        channels: 3 (RGB) or 1 (grayscale).
        max_pixels: refuse images larger than this (width x height), read from
            the header before any pixel is decoded.

    Raises:
        ValueError: the source cannot be read or decoded, is larger than
            ``max_pixels``, or ``channels`` is not 1 or 3.
    """
    if channels not in (1, 3):
        raise ValueError(f"Only 1- or 3-channel models can take image files, this one has {channels} channels.")
    name = _source_name(source)
    data = read_image_bytes(source, name)
    if max_pixels is not None:
        check_pixel_limit(*image_header_size(data, name), max_pixels, name)
    return to_model_pixels(decode_native(data, name), size, channels)


def list_image_folder(
    root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> tuple[list[Path], list[str]]:
    """Images of ``root/<class>/**/*``: ``(paths, class names)``, sorted; hidden files/folders skipped.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
        ValueError: no image was found.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder not found: {root}")
    extensions = tuple(e.lower() for e in extensions)
    paths: list[Path] = []
    labels: list[str] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
            for filename in sorted(filenames):
                if not filename.startswith(".") and filename.lower().endswith(extensions):
                    paths.append(Path(dirpath) / filename)
                    labels.append(class_dir.name)
    if not paths:
        raise ValueError(f"No images ({', '.join(extensions)}) found in class sub-folders of {root}.")
    return paths, labels


__all__ = [
    "GRAY_WEIGHTS",
    "IMAGE_EXTENSIONS",
    "check_pixel_limit",
    "decode_native",
    "image_header_size",
    "list_image_folder",
    "load_image",
    "read_image_bytes",
    "resize_bilinear_antialias",
    "to_model_pixels",
]
