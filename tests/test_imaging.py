"""The one image decoder (detreg_runtime.imaging, numpy/PIL/simplejpeg) against TensorFlow as the reference.

The reference is ``tf.io.decode_image(dtype=uint8)`` + ``tf.image.resize(bilinear, antialias=True)``
(gray from colour: TF's resize, then ``rgb_to_grayscale``'s weights), the SavedModel's in-graph
decoder (``detreg_keras.export.decode_image_tensor``) and the training pipeline
(``detreg_keras.data.pipeline``), on a generated corpus of every supported format and colour type.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from detreg_runtime import imaging
from tests.image_corpus import HEIGHT, SIZES, WIDTH, corpus, png16

CORPUS = corpus()
GRAY = tf.constant([0.2989, 0.5870, 0.1140], tf.float32)


def _tf_resize(image: tf.Tensor, size) -> np.ndarray:
    return tf.clip_by_value(tf.image.resize(image, size, "bilinear", antialias=True), 0.0, 255.0)


def tf_reference(data: bytes, size, channels: int) -> np.ndarray:
    """TensorFlow's pixels for ``data``: decode_image, RGB or gray, antialiased bilinear resize."""
    if channels == 3:
        return _tf_resize(tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False), size).numpy()
    native = tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)
    if native.shape[-1] < 3:
        return _tf_resize(native[..., :1], size).numpy()
    return tf.reduce_sum(_tf_resize(native[..., :3], size) * GRAY, axis=-1, keepdims=True).numpy()


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_native_decode_equals_tf_decode_image(name):
    """Same shape (the file's own channels) and the same uint8 values as tf.io.decode_image(channels=0)."""
    expected = tf.io.decode_image(CORPUS[name], channels=0, dtype=tf.uint8, expand_animations=False).numpy()
    got = imaging.decode_native(CORPUS[name], name)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_load_image_is_bit_identical_to_tensorflow(name, channels):
    """Down-, up-, identity and mixed resizes: exactly TF's float32 pixels (max difference 0)."""
    for size in SIZES:
        got = imaging.load_image(CORPUS[name], size, channels)
        assert got.dtype == np.float32 and got.shape == (*size, channels)
        np.testing.assert_array_equal(got, tf_reference(CORPUS[name], size, channels), err_msg=f"{name} {size}")


@pytest.mark.parametrize("channels", [1, 3])
def test_load_image_equals_the_savedmodel_graph_decoder(channels):
    """The in-graph decoder of serving_default (detreg_keras.export) gives the same pixels on the whole corpus."""
    from detreg_keras.export import decode_image_tensor

    shape = (28, 28, channels)
    graph = tf.function(lambda data: decode_image_tensor(data, shape), input_signature=[tf.TensorSpec([], tf.string)])
    for name, data in CORPUS.items():
        np.testing.assert_array_equal(imaging.load_image(data, shape[:2], channels), graph(tf.constant(data)).numpy(),
                                      err_msg=name)  # fmt: skip


def test_training_decoding_equals_runtime_decoding():
    """The training pipeline's decode + eval resize (TF ops) and the runtime decoder agree on the corpus."""
    from detreg_keras.data.pipeline import decode_image, eval_transform

    for name, data in CORPUS.items():
        for size in SIZES:
            training = eval_transform(decode_image(tf.constant(data)), size, mode="resize").numpy()
            np.testing.assert_array_equal(imaging.load_image(data, size, 3), training, err_msg=f"{name} {size}")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_downscale_is_bit_identical(fmt):
    """A 410x300 photo-like image to 28x28 and 224x224 (spans of up to 31 source pixels)."""
    rng = np.random.default_rng(9)
    yy, xx = np.mgrid[0:300, 0:410]
    base = np.stack([yy * 0.8, xx * 0.6, (yy + xx) * 0.35], -1) + rng.normal(0, 12, (300, 410, 3))
    buffer = io.BytesIO()
    Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(buffer, fmt)
    for size in ((28, 28), (224, 224), (17, 300)):
        for channels in (1, 3):
            np.testing.assert_array_equal(imaging.load_image(buffer.getvalue(), size, channels),
                                          tf_reference(buffer.getvalue(), size, channels))  # fmt: skip


def test_sixteen_bit_png_keeps_its_range():
    """A 16-bit ramp keeps mean 127.5 (PIL's convert("L") clips it to 251): the high byte, as TF."""
    ramp = np.tile(np.linspace(0, 65535, WIDTH).astype(np.uint16), (HEIGHT, 1))[..., None]
    pixels = imaging.load_image(png16(ramp), (HEIGHT, WIDTH), 1)
    np.testing.assert_array_equal(pixels, (ramp >> 8).astype(np.float32))
    assert pixels.mean() == pytest.approx(127.5, abs=0.6)
    assert np.asarray(Image.open(io.BytesIO(png16(ramp))).convert("L")).mean() > 250


def test_one_extension_list():
    """Training folders and serving list the same extensions, and every listed format decodes in both."""
    from detreg_keras.data import folders

    assert folders.IMAGE_EXTENSIONS is imaging.IMAGE_EXTENSIONS
    formats = {name.split("_")[0].rstrip("0123456789") for name in CORPUS}
    assert {".png", ".jpg", ".bmp", ".gif", ".webp"} <= set(imaging.IMAGE_EXTENSIONS)
    assert {"png", "jpeg", "bmp", "gif", "webp"} == formats


def test_bad_input_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"Cannot decode image <bytes>"):
        imaging.load_image(b"not an image", (8, 8))
    with pytest.raises(ValueError, match=r"Cannot decode image"):
        imaging.load_image(CORPUS["jpeg_rgb444"][:40], (8, 8))
    with pytest.raises(ValueError, match=r"too large: 53x37 exceeds the limit of 100 pixels"):
        imaging.load_image(CORPUS["png8_rgb"], (8, 8), max_pixels=100)
    with pytest.raises(ValueError, match="1- or 3-channel"):
        imaging.load_image(CORPUS["png8_rgb"], (8, 8), channels=2)
    with pytest.raises(ValueError, match="not found"):
        imaging.load_image(tmp_path / "missing.png", (8, 8))
    with pytest.raises(ValueError, match="type int"):
        imaging.load_image(3, (8, 8))
