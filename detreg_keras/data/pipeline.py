"""tf.data input pipelines: decoding, augmentation, batching.

Images leave these pipelines as **float32 raw pixels in [0, 255]**, RGB,
``[batch, height, width, 3]``; the backbone's own normalisation lives in the
model. Labels are ``int64``.

* :func:`decode_image` decodes JPEG/PNG/BMP/GIF bytes to ``uint8`` RGB.
* :func:`train_transform` is torchvision's ``RandomResizedCrop(image_size,
  scale, ratio)`` + ``RandomHorizontalFlip()``, the training augmentation of
  the official Proxy Anchor code (and of the DReg paper, ``image_size=224``).
* :func:`eval_transform` is ``Resize(256)`` + ``CenterCrop(224)`` (shorter
  side resized first), or a plain resize for small images (``mode="resize"``).
* :func:`make_train_dataset` / :func:`make_eval_dataset` build the pipelines
  from :class:`~detreg_keras.data.records.ImageRecords` or from a tf.data
  dataset of ``(image, label)``.

Randomness is stateless: every training example carries its own seed drawn
from the sampler's seed and the epoch (see
:func:`detreg_keras.data.sampling.epoch_seeds`), so a pipeline built with the
same arguments yields the same batches, whatever ``num_parallel_calls``.

**Unreadable images never stop an epoch.** Decoding runs inside the parallel
``map`` and the dataset then applies ``ignore_errors(log_warning=True)``:
TensorFlow logs each dropped element, and a :class:`DecodeStats` counts
attempted and decoded images; a training pipeline built from
:class:`ImageRecords` logs a warning summary (logger
``detreg_keras.data.pipeline``) at the start of the next epoch when images
were dropped (for other sources, read the :class:`DecodeStats` you pass in).
With random batches a bad image is just left out of its batch stream; with
batch-planning samplers (m-per-class, SPC-R, the embedded samplers) a whole
batch is decoded in one step and dropped as a unit, so that every remaining
batch keeps its exact composition (``P x m`` for m-per-class). (Loaders already skip
unreadable files at listing time, so this is a second line of defence.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import tensorflow as tf

from detreg_keras.data.records import ImageRecords
from detreg_keras.data.sampling import (
    MPerClassSampler,
    RandomSampler,
    Sampler,
    plan_dataset,
)

logger = logging.getLogger(__name__)

ImageSize = int | tuple[int, int]
_SEED_MAX = 2**31 - 1

#: Defaults of torchvision's RandomResizedCrop, as in the official Proxy Anchor code.
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _hw(size: ImageSize) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


# ----------------------------------------------------------------------------- decoding


def ensure_rgb(image: tf.Tensor) -> tf.Tensor:
    """Converts a ``[H, W, C]`` image with 1 (gray), 2 (gray+alpha), 3 or 4
    (RGBA) channels to 3-channel RGB; alpha is dropped."""
    image = tf.convert_to_tensor(image)
    channels = image.shape[-1]
    if channels == 3:
        return image
    if channels in (1, 2):
        return tf.repeat(image[..., :1], 3, axis=-1)
    if channels == 4:
        return image[..., :3]
    out = tf.cond(
        tf.shape(image)[-1] < 3,
        lambda: tf.repeat(image[..., :1], 3, axis=-1),
        lambda: image[..., :3],
    )
    out.set_shape([*image.shape[:-1], 3])
    return out


def decode_image(data: tf.Tensor) -> tf.Tensor:
    """Decodes encoded image bytes to ``uint8 [H, W, 3]`` RGB.

    JPEG, PNG, BMP and GIF (first frame) are supported through
    ``tf.io.decode_image(..., channels=3, expand_animations=False)``:
    grayscale is replicated to RGB, the alpha channel of RGBA is dropped,
    palette and 16-bit PNGs are converted.

    Args:
        data: scalar ``tf.string`` with the file content.

    Returns:
        ``uint8`` tensor ``[H, W, 3]``.

    Raises:
        tf.errors.InvalidArgumentError: for unreadable data (the pipelines
            drop such elements).
    """
    image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


# ----------------------------------------------------------------------------- transforms


def _resize(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    out = tf.image.resize(image, size, method="bilinear", antialias=True)
    return tf.clip_by_value(out, 0.0, 255.0)


def random_resized_crop_box(
    height: tf.Tensor,
    width: tf.Tensor,
    seed: tf.Tensor,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    attempts: int = 10,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """torchvision ``RandomResizedCrop.get_params``, with stateless randomness.

    Up to ``attempts`` boxes of area ``uniform(scale) * H * W`` and
    log-uniform aspect ratio in ``ratio`` are drawn; the first that fits is
    placed uniformly at random, otherwise the central crop with the aspect
    ratio clamped to ``ratio`` is used.

    Args:
        height: image height (scalar int).
        width: image width (scalar int).
        seed: stateless seed, shape ``[2]``.
        scale: range of the crop area relative to the image.
        ratio: range of the crop aspect ratio (width / height).
        attempts: number of draws before falling back.

    Returns:
        ``(top, left, crop_height, crop_width)`` as ``int32`` scalars.
    """
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    h_f = tf.cast(height, tf.float32)
    w_f = tf.cast(width, tf.float32)
    s_area, s_ratio, s_top, s_left = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    target = h_f * w_f * tf.random.stateless_uniform([attempts], s_area, scale[0], scale[1])
    aspect = tf.exp(
        tf.random.stateless_uniform([attempts], s_ratio, math.log(ratio[0]), math.log(ratio[1]))
    )
    cand_w = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
    cand_h = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
    fits = (cand_w > 0) & (cand_h > 0) & (cand_w <= width) & (cand_h <= height)
    found = tf.reduce_any(fits)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

    in_ratio = w_f / h_f
    fb_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(h_f * ratio[1]), tf.int32), width)
    fb_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w_f / ratio[0]), tf.int32), height)
    crop_h = tf.where(found, cand_h[first], fb_h)
    crop_w = tf.where(found, cand_w[first], fb_w)
    rand_top = tf.random.stateless_uniform(
        [], s_top, minval=0, maxval=height - crop_h + 1, dtype=tf.int32
    )
    rand_left = tf.random.stateless_uniform(
        [], s_left, minval=0, maxval=width - crop_w + 1, dtype=tf.int32
    )
    top = tf.where(found, rand_top, (height - crop_h) // 2)
    left = tf.where(found, rand_left, (width - crop_w) // 2)
    return top, left, crop_h, crop_w


def random_resized_crop(
    image: tf.Tensor, seed: tf.Tensor, scale: tuple[float, float], ratio: tuple[float, float]
) -> tf.Tensor:
    """The crop :func:`random_resized_crop_box` draws for seed ``seed`` out of an ``[H, W, 3]`` image."""
    shape = tf.shape(image)
    top, left, h, w = random_resized_crop_box(shape[0], shape[1], seed, scale, ratio)
    return tf.slice(image, tf.stack([top, left, 0]), tf.stack([h, w, 3]))


def _seeds(seed: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor]:
    if seed is None:
        seed = tf.random.uniform([2], maxval=_SEED_MAX, dtype=tf.int64)
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    return crop_seed, flip_seed


def _finish_train(
    crop: tf.Tensor, size: tuple[int, int], flip: bool, flip_seed: tf.Tensor
) -> tf.Tensor:
    out = _resize(crop, size)
    if flip:
        out = tf.image.stateless_random_flip_left_right(out, seed=flip_seed)
    out.set_shape([size[0], size[1], 3])
    return out


def train_transform(
    image: tf.Tensor,
    image_size: ImageSize = 224,
    *,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    flip: bool = True,
    seed: tf.Tensor | None = None,
) -> tf.Tensor:
    """Training augmentation: random resized crop + random horizontal flip.

    Matches ``RandomResizedCrop(image_size, scale, ratio)`` followed by
    ``RandomHorizontalFlip()`` (bilinear, antialiased resize).

    Args:
        image: ``[H, W, C]`` image (any numeric dtype holding [0, 255] values;
            1 to 4 channels, converted to RGB).
        image_size: output size, ``int`` or ``(height, width)``.
        scale: crop area range relative to the image (``(0.08, 1.0)`` as in
            torchvision; raise the lower bound for small images).
        ratio: crop aspect-ratio range.
        flip: apply a random horizontal flip.
        seed: stateless seed ``[2]``; ``None`` draws one from the global RNG.

    Returns:
        ``float32 [height, width, 3]`` raw pixel values in ``[0, 255]``.
    """
    size = _hw(image_size)
    crop_seed, flip_seed = _seeds(seed)
    crop = random_resized_crop(ensure_rgb(tf.convert_to_tensor(image)), crop_seed, scale, ratio)
    return _finish_train(crop, size, flip, flip_seed)


def decode_train_transform(
    data: tf.Tensor,
    image_size: ImageSize = 224,
    *,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    flip: bool = True,
    seed: tf.Tensor | None = None,
) -> tf.Tensor:
    """:func:`decode_image` + :func:`train_transform`, decoding only the crop of
    JPEGs (``tf.image.decode_and_crop_jpeg``), which is much cheaper."""
    size = _hw(image_size)
    crop_seed, flip_seed = _seeds(seed)

    def jpeg() -> tf.Tensor:
        shape = tf.image.extract_jpeg_shape(data)
        box = random_resized_crop_box(shape[0], shape[1], crop_seed, scale, ratio)
        return tf.image.decode_and_crop_jpeg(data, tf.stack(box), channels=3)

    def other() -> tf.Tensor:
        return random_resized_crop(decode_image(data), crop_seed, scale, ratio)

    crop = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    crop.set_shape([None, None, 3])
    return _finish_train(crop, size, flip, flip_seed)


def eval_transform(
    image: tf.Tensor,
    image_size: ImageSize = 224,
    resize_size: int | None = 256,
    mode: Literal["center_crop", "resize"] = "center_crop",
) -> tf.Tensor:
    """Evaluation preprocessing.

    ``mode="center_crop"``: torchvision ``Resize(resize_size)`` (shorter side to
    ``resize_size``, longer side ``int(resize_size * long / short)``) then
    ``CenterCrop(image_size)`` -- the paper's 256 / 224 setting.
    ``mode="resize"``: a plain resize to ``image_size`` (for small images such
    as Omniglot's 105x105; ``resize_size`` is ignored).

    Args:
        image: ``[H, W, C]`` image with [0, 255] values (1-4 channels).
        image_size: output size, ``int`` or ``(height, width)``.
        resize_size: shorter-side size before cropping; ``None`` means the
            larger of ``image_size``.
        mode: ``"center_crop"`` or ``"resize"``.

    Returns:
        ``float32 [height, width, 3]`` raw pixel values in ``[0, 255]``.
    """
    size = _hw(image_size)
    image = ensure_rgb(tf.convert_to_tensor(image))
    if mode == "resize":
        out = _resize(image, size)
    elif mode == "center_crop":
        short_target = max(size) if resize_size is None else int(resize_size)
        if short_target < max(size):
            raise ValueError(f"resize_size={resize_size} is smaller than the crop {size}.")
        shape = tf.shape(image)
        h = tf.cast(shape[0], tf.float64)
        w = tf.cast(shape[1], tf.float64)
        short = tf.minimum(h, w)
        target = tf.constant(float(short_target), tf.float64)
        new_h = tf.where(h <= w, target, tf.floor(target * h / short))
        new_w = tf.where(w <= h, target, tf.floor(target * w / short))
        new_h = tf.cast(new_h, tf.int32)
        new_w = tf.cast(new_w, tf.int32)
        resized = tf.clip_by_value(
            tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True),
            0.0,
            255.0,
        )
        top = tf.cast(tf.round(tf.cast(new_h - size[0], tf.float32) / 2.0), tf.int32)
        left = tf.cast(tf.round(tf.cast(new_w - size[1], tf.float32) / 2.0), tf.int32)
        out = tf.slice(resized, tf.stack([top, left, 0]), [size[0], size[1], 3])
    else:
        raise ValueError(f"mode must be 'center_crop' or 'resize', got {mode!r}.")
    out = tf.cast(out, tf.float32)
    out.set_shape([size[0], size[1], 3])
    return out


# ----------------------------------------------------------------------------- bookkeeping


class DecodeStats:
    """Counts images a pipeline tried to decode and those that succeeded.

    ``dropped = attempted - decoded``. While a pipeline runs this includes the
    images still being decoded, so it is exact only once an iteration has
    finished. Pass the same object to :func:`make_train_dataset` /
    :func:`make_eval_dataset` to read it.

    A training pipeline built from :class:`ImageRecords` reports drops at the
    start of each epoch (logger ``detreg_keras.data.pipeline``): with
    ``repeat=False`` those of the previous iteration, which has finished; with
    ``repeat=True``, where images of the previous epoch may still be in flight,
    those of the epoch before it, counted separately per epoch parity, so that
    in-flight images are never reported as dropped.
    """

    def __init__(self) -> None:
        with tf.init_scope():
            self.attempted = tf.Variable(0, dtype=tf.int64, trainable=False, name="attempted")
            self.decoded = tf.Variable(0, dtype=tf.int64, trainable=False, name="decoded")
            # per epoch parity (repeat=True pipelines): [attempted, decoded] x [even, odd]
            self._by_parity = tf.Variable(
                tf.zeros([2, 2], tf.int64), trainable=False, name="by_epoch_parity"
            )
        self._reported = 0

    @property
    def dropped(self) -> int:
        """Images that failed to decode so far (see the class docstring)."""
        return int(self.attempted.numpy() - self.decoded.numpy())

    def summary(self) -> str:
        """A one-line summary."""
        return (
            f"{int(self.decoded.numpy())} of {int(self.attempted.numpy())} images decoded, "
            f"{self.dropped} dropped as unreadable"
        )

    def _warn(self, new: int, what: str) -> None:
        logger.warning("detreg_keras.data: %d unreadable image(s) dropped %s.", new, what)

    def warn_if_dropped(self) -> int:
        """Logs a warning if images were dropped since the last call.

        Exact only when no image is in flight (no iteration running).

        Returns:
            Number of newly dropped images.
        """
        dropped = self.dropped
        new = dropped - self._reported
        if new > 0:
            self._warn(new, f"since the last report ({self.summary()})")
            self._reported = dropped
        return max(new, 0)

    def _epoch_started(self, epoch: int, repeat: bool) -> int:
        """Called by a training pipeline before it plans ``epoch``; returns the drops it reported."""
        if not repeat:
            return self.warn_if_dropped() if epoch > 0 else 0
        parity = epoch % 2
        new = 0
        if epoch >= 2:  # epoch - 2 used this parity; every image of it has finished by now
            attempted, decoded = (int(v) for v in self._by_parity[:, parity].numpy())
            new = attempted - decoded
            if new > 0:
                self._warn(new, f"in epoch {epoch - 2} ({decoded} of {attempted} decoded)")
                self._reported += new
        self._by_parity.scatter_nd_update([[0, parity], [1, parity]], tf.zeros([2], tf.int64))
        return max(new, 0)

    def _track(
        self, count: int | tf.Tensor, fn: Callable[[], tf.Tensor], epoch: tf.Tensor | None = None
    ) -> tf.Tensor:
        count = tf.cast(count, tf.int64)
        slot = None
        if epoch is not None:
            slot = tf.one_hot(tf.cast(epoch % 2, tf.int32), 2, dtype=tf.int64) * count
            self._by_parity.scatter_nd_add([[0]], slot[None])
        self.attempted.assign_add(count)
        out = fn()
        with tf.control_dependencies([out]):
            self.decoded.assign_add(count)
            if slot is not None:
                self._by_parity.scatter_nd_add([[1]], slot[None])
            return tf.identity(out)


# ----------------------------------------------------------------------------- sources


def records_from_dataset(
    dataset: tf.data.Dataset, class_names: list[str] | None = None
) -> ImageRecords:
    """Materialises a ``(image, label)`` dataset as in-memory ImageRecords.

    Encoded images (``tf.string``) are kept as they are; decoded images
    (``uint8 [H, W, C]``) are re-encoded losslessly as PNG, which is slow and
    memory hungry for large datasets: prefer loaders' encoded output (e.g.
    ``load_cub200(..., decode=False)``).

    Args:
        dataset: unbatched dataset of ``(image, label)``.
        class_names: names for labels ``0..C-1``; defaults to ``str(label)``
            for ``0..max(label)``.

    Returns:
        :class:`ImageRecords` with ``data`` set, paths ``"example<i>"``.
    """
    image_spec = dataset.element_spec[0]
    if image_spec.dtype != tf.string:
        dataset = dataset.map(
            lambda image, label: (
                tf.io.encode_png(ensure_rgb(tf.cast(image, tf.uint8))),
                label,
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    data: list[bytes] = []
    labels: list[int] = []
    for image, label in dataset.as_numpy_iterator():
        data.append(bytes(image))
        labels.append(int(label))
    if not labels:
        raise ValueError("records_from_dataset: the dataset is empty.")
    if class_names is None:
        class_names = [str(i) for i in range(max(labels) + 1)]
    return ImageRecords(
        paths=[f"example{i}" for i in range(len(data))],
        labels=np.asarray(labels, dtype=np.int64),
        class_names=class_names,
        data=data,
    )


def _read(source: tf.Tensor, in_memory: bool) -> tf.Tensor:
    return source if in_memory else tf.io.read_file(source)


#: sources fetched per Python call of the training and evaluation pipelines
_SOURCE_CHUNK = 256


def _take_sources(records: ImageRecords) -> Callable[[tf.Tensor], tf.Tensor]:
    """A graph function ``rows -> sources[rows]`` (paths or encoded bytes) via ``numpy_function``.

    The sources stay in Python (never a graph constant: in-memory datasets can
    exceed protobuf's 2 GB limit when tf.data serialises a pipeline); one call
    fetches a whole chunk or batch of rows.
    """
    sources: list = records.data if records.data is not None else records.paths

    def take(rows: np.ndarray) -> np.ndarray:
        items = np.empty(rows.shape, dtype=object)
        items.reshape(-1)[:] = [sources[i] for i in rows.reshape(-1)]
        return items

    def fetch(rows: tf.Tensor) -> tf.Tensor:
        out = tf.numpy_function(take, [rows], tf.string, stateful=False, name="take_sources")
        out.set_shape(rows.shape)
        return out

    return fetch


def _records_source(
    records: ImageRecords,
    sampler: Sampler,
    repeat: bool,
    on_epoch: Callable[[int], None] | None,
) -> tf.data.Dataset:
    """``(source, label, seed, epoch)`` per example (random) or per batch row (m-per-class).

    The epoch plans come from :func:`~detreg_keras.data.sampling.plan_dataset`
    (one Python call per epoch), the sources from :func:`_take_sources` (one
    call per chunk of :data:`_SOURCE_CHUNK` examples or per m-per-class batch).
    """
    fetch = _take_sources(records)
    labels = tf.constant(records.labels, tf.int64)
    random = isinstance(sampler, RandomSampler)

    def rows(epoch: tf.Tensor, indices: tf.Tensor, seeds: tf.Tensor) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices((indices, seeds))
        if random:
            ds = ds.batch(_SOURCE_CHUNK)
        ds = ds.map(lambda idx, sd: (fetch(idx), tf.gather(labels, idx), sd, tf.fill(tf.shape(idx), epoch)))
        return ds.unbatch() if random else ds

    return plan_dataset(sampler, repeat, on_epoch).flat_map(rows)


def _resolve_batch(
    batch_size: int | None, classes_per_batch: int | None, samples_per_class: int | None
) -> tuple[int, int, int]:
    b, p, m = batch_size, classes_per_batch, samples_per_class
    if p is None and b is not None and m is not None:
        if b % m:
            raise ValueError(f"batch_size={b} is not a multiple of samples_per_class={m}.")
        p = b // m
    if m is None and b is not None and p is not None:
        if b % p:
            raise ValueError(f"batch_size={b} is not a multiple of classes_per_batch={p}.")
        m = b // p
    if p is None or m is None:
        raise ValueError(
            "m_per_class sampling needs two of batch_size, classes_per_batch, samples_per_class."
        )
    if b is not None and b != p * m:
        raise ValueError(f"batch_size={b} != classes_per_batch x samples_per_class = {p} x {m}.")
    return p * m, p, m


def _sampler_batch_size(
    sampler: Sampler,
    batch_size: int | None,
    classes_per_batch: int | None,
    samples_per_class: int | None,
) -> int:
    """The batch size of an index sampler object; a clear error when the arguments contradict it."""
    if not hasattr(sampler, "epoch_indices") or not hasattr(sampler, "num_examples"):
        raise TypeError(
            f"sampler must be 'random', 'm_per_class' or an index sampler (with epoch_indices, "
            f"num_examples and batch_size), got {type(sampler).__name__}."
        )
    if isinstance(sampler, RandomSampler):
        if batch_size is None or batch_size < 1:
            raise ValueError("make_train_dataset needs a positive batch_size with a RandomSampler.")
        return int(batch_size)
    own = int(sampler.batch_size)
    if batch_size is not None and batch_size != own:
        raise ValueError(
            f"batch_size={batch_size} differs from the sampler's batch_size={own}; "
            "pass batch_size=None (the sampler's is used)."
        )
    if classes_per_batch is not None or samples_per_class is not None:
        raise ValueError(
            "classes_per_batch / samples_per_class only apply to sampler='m_per_class'; "
            "a sampler object sets its own batch composition."
        )
    return own


def _check_sampler_size(sampler: Sampler, num_examples: int) -> Sampler:
    """``sampler`` if it indexes exactly ``num_examples`` examples (the records, in order)."""
    if sampler.num_examples != num_examples:
        raise ValueError(
            f"the sampler indexes {sampler.num_examples} examples but the source holds "
            f"{num_examples}; build the sampler from the labels of this source, in order."
        )
    return sampler


# ----------------------------------------------------------------------------- pipelines


def make_train_dataset(
    source: ImageRecords | tf.data.Dataset,
    batch_size: int | None = None,
    image_size: ImageSize = 224,
    *,
    sampler: Literal["random", "m_per_class"] | Sampler = "random",
    classes_per_batch: int | None = None,
    samples_per_class: int | None = None,
    seed: int = 0,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    flip: bool = True,
    repeat: bool = False,
    drop_remainder: bool = True,
    shuffle_buffer: int = 10_000,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    stats: DecodeStats | None = None,
) -> tf.data.Dataset:
    """Training pipeline: sample, decode, augment, batch, prefetch.

    Args:
        source: :class:`ImageRecords`, or an unbatched ``tf.data.Dataset`` of
            ``(image, label)`` with encoded (``tf.string``) or decoded
            (``uint8 [H, W, C]``) images. A dataset is shuffled with a buffer
            for ``sampler="random"``; for ``"m_per_class"`` it is first
            materialised with :func:`records_from_dataset` (one full pass).
        batch_size: images per batch (``random``); for ``m_per_class`` any two
            of ``batch_size``, ``classes_per_batch``, ``samples_per_class``.
        image_size: output size, ``int`` or ``(height, width)``.
        sampler: ``"random"`` (shuffled examples, see
            :class:`~detreg_keras.data.sampling.RandomSampler`),
            ``"m_per_class"`` (see
            :class:`~detreg_keras.data.sampling.MPerClassSampler`), or an
            index sampler object over the source's examples in order (e.g.
            :class:`~detreg_keras.data.sampling.SPCRSampler` or an embedded
            sampler of :mod:`~detreg_keras.data.embedded_sampling`): its
            ``batch_size`` is used and ``batch_size``,
            ``classes_per_batch`` and ``samples_per_class`` must be ``None``
            or agree with it; its own ``seed`` orders the batches and seeds
            the augmentations (``seed`` is then unused).
        classes_per_batch: ``P`` for ``m_per_class``.
        samples_per_class: ``m`` for ``m_per_class``.
        seed: seeds the sampling order and the augmentations.
        scale: random-resized-crop area range.
        ratio: random-resized-crop aspect-ratio range.
        flip: random horizontal flips.
        repeat: ``False``: one epoch per iteration (a new iteration, e.g. the
            next Keras epoch, gets the next epoch's order); ``True``: endless.
        drop_remainder: drop the last, short batch (``random`` only;
            m-per-class batches are always full).
        shuffle_buffer: shuffle buffer for a ``tf.data.Dataset`` source.
        num_parallel_calls: parallelism of the decode/augment map.
        stats: optional :class:`DecodeStats` to count unreadable images.

    Returns:
        Dataset of ``(float32 [B, H, W, 3] in [0, 255], int64 [B])``.
    """
    stats = stats or DecodeStats()
    if isinstance(sampler, str):
        if sampler not in ("random", "m_per_class"):
            raise ValueError(
                f"sampler must be 'random', 'm_per_class' or an index sampler object, got {sampler!r}."
            )
        if sampler == "m_per_class":
            batch_size, p, m = _resolve_batch(batch_size, classes_per_batch, samples_per_class)
        elif batch_size is None or batch_size < 1:
            raise ValueError("make_train_dataset needs a positive batch_size.")
    else:
        batch_size = _sampler_batch_size(sampler, batch_size, classes_per_batch, samples_per_class)

    def load_one(data: tf.Tensor, seed_: tf.Tensor) -> tf.Tensor:
        return decode_train_transform(
            data, image_size, scale=scale, ratio=ratio, flip=flip, seed=seed_
        )

    def on_epoch(epoch: int) -> None:
        stats._epoch_started(epoch, repeat)

    if isinstance(source, tf.data.Dataset) and isinstance(sampler, str) and sampler == "random":
        encoded = source.element_spec[0].dtype == tf.string

        def load_ds(element: tuple[tf.Tensor, tf.Tensor], seed_: tf.Tensor):
            image, label = element

            def run() -> tf.Tensor:
                if encoded:
                    return load_one(image, seed_)
                return train_transform(
                    image, image_size, scale=scale, ratio=ratio, flip=flip, seed=seed_
                )

            return stats._track(1, run), tf.cast(label, tf.int64)

        ds = source.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds))
        ds = ds.map(load_ds, num_parallel_calls=num_parallel_calls)
        ds = ds.ignore_errors(log_warning=True)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        return ds.prefetch(tf.data.AUTOTUNE)

    records = records_from_dataset(source) if isinstance(source, tf.data.Dataset) else source
    in_memory = records.in_memory
    if not isinstance(sampler, str):
        index_sampler: Sampler = _check_sampler_size(sampler, len(records))
    elif sampler == "random":
        index_sampler = RandomSampler(len(records), seed=seed)
    else:
        index_sampler = MPerClassSampler(records.labels, p, m, seed=seed)
    ds = _records_source(records, index_sampler, repeat, on_epoch)

    def track_epoch(epoch: tf.Tensor) -> tf.Tensor | None:
        # per-epoch-parity counts are only read with repeat=True (DecodeStats._epoch_started)
        return epoch if repeat else None

    if isinstance(index_sampler, RandomSampler):

        def load_element(src: tf.Tensor, label: tf.Tensor, seed_: tf.Tensor, epoch: tf.Tensor):
            return stats._track(1, lambda: load_one(_read(src, in_memory), seed_), track_epoch(epoch)), label

        ds = ds.map(load_element, num_parallel_calls=num_parallel_calls)
        ds = ds.ignore_errors(log_warning=True)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    else:
        size = _hw(image_size)

        def load_batch(srcs: tf.Tensor, labels: tf.Tensor, seeds_: tf.Tensor, epochs: tf.Tensor):
            def run() -> tf.Tensor:
                return tf.map_fn(
                    lambda args: load_one(_read(args[0], in_memory), args[1]),
                    (srcs, seeds_),
                    fn_output_signature=tf.TensorSpec([size[0], size[1], 3], tf.float32),
                    parallel_iterations=min(batch_size, 16),
                )

            return stats._track(batch_size, run, track_epoch(epochs[0])), labels

        ds = ds.map(load_batch, num_parallel_calls=num_parallel_calls)
        ds = ds.ignore_errors(log_warning=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def make_eval_dataset(
    source: ImageRecords | tf.data.Dataset,
    batch_size: int = 128,
    image_size: ImageSize = 224,
    *,
    resize_size: int | None = 256,
    mode: Literal["center_crop", "resize"] = "center_crop",
    num_parallel_calls: int = tf.data.AUTOTUNE,
    stats: DecodeStats | None = None,
) -> tf.data.Dataset:
    """Evaluation pipeline: decode, :func:`eval_transform`, batch, in order.

    Unreadable images are dropped together with their labels (counted by
    ``stats``), so embeddings and labels stay aligned.

    Args:
        source: :class:`ImageRecords` or an unbatched ``tf.data.Dataset`` of
            ``(image, label)`` (encoded ``tf.string`` or decoded images).
        batch_size: images per batch (the last batch may be shorter).
        image_size: output size, ``int`` or ``(height, width)``.
        resize_size: shorter-side resize before the centre crop.
        mode: ``"center_crop"`` (Resize + CenterCrop) or ``"resize"``.
        num_parallel_calls: parallelism of the decode map.
        stats: optional :class:`DecodeStats`.

    Returns:
        Dataset of ``(float32 [B, H, W, 3] in [0, 255], int64 [B])``.
    """
    stats = stats or DecodeStats()
    _hw(image_size)
    if mode == "center_crop" and resize_size is not None and resize_size < max(_hw(image_size)):
        raise ValueError(f"resize_size={resize_size} is smaller than image_size={image_size}.")

    def transform(image: tf.Tensor) -> tf.Tensor:
        return eval_transform(image, image_size, resize_size=resize_size, mode=mode)

    if isinstance(source, tf.data.Dataset):
        encoded = source.element_spec[0].dtype == tf.string

        def load_ds(image: tf.Tensor, label: tf.Tensor):
            def run() -> tf.Tensor:
                return transform(decode_image(image) if encoded else image)

            return stats._track(1, run), tf.cast(label, tf.int64)

        ds = source.map(load_ds, num_parallel_calls=num_parallel_calls)
    else:
        records = source
        in_memory = records.in_memory
        fetch = _take_sources(records)
        labels = tf.constant(records.labels, tf.int64)
        rows = tf.data.Dataset.range(len(records)).batch(_SOURCE_CHUNK)
        ds = rows.map(lambda idx: (fetch(idx), tf.gather(labels, idx))).unbatch()

        def load_element(src: tf.Tensor, label: tf.Tensor):
            return stats._track(1, lambda: transform(decode_image(_read(src, in_memory)))), label

        ds = ds.map(load_element, num_parallel_calls=num_parallel_calls)
    ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(batch_size)
    return ds.prefetch(tf.data.AUTOTUNE)
