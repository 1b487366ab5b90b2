"""The input pipelines of a run: training batches (and their sampler's callbacks) and evaluation data."""

from __future__ import annotations

import math
import sys
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from detreg_keras.data import (
    DDMSampler,
    DecodeStats,
    EmbeddingStore,
    FRDSampler,
    GreedyCoresetSampler,
    ImageRecords,
    PoolEmbeddingRefresh,
    RandomSampler,
    SPCRSampler,
    index_dataset,
    m_per_class_steps,
    make_eval_dataset,
    make_train_dataset,
)
from detreg_keras.data.registry import Source, source_labels
from detreg_keras.data.sampling import Sampler, class_groups
from detreg_keras.training.config import SAMPLERS, TrainConfig


def with_channels(ds: tf.data.Dataset, channels: int) -> tf.data.Dataset:
    """The pipelines yield RGB; ``channels=1`` averages to grayscale."""
    if channels == 3:
        return ds
    if channels != 1:
        raise ValueError(f"channels must be 1 or 3 for image datasets, got {channels}.")
    return ds.map(lambda x, y: (tf.reduce_mean(x, axis=-1, keepdims=True), y), num_parallel_calls=tf.data.AUTOTUNE)


def make_array_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool, seed: int) -> tf.data.Dataset:
    """Batches of ``(images, labels)`` from in-memory arrays, reshuffled every epoch.

    The order of the ``e``-th iteration (epoch) is the permutation drawn from
    ``numpy.random.default_rng([seed, e])``, a function of the seed and the
    epoch number only, like the samplers of :mod:`detreg_keras.data.sampling`
    (so a resumed run can skip to the right epoch).
    """
    if len(images) == 0:
        raise ValueError("The training set is empty: no images to train on.")
    images_t = tf.constant(images.astype("float32"))
    labels_t = tf.constant(labels.astype("int32"))
    n = len(images)
    if not shuffle:
        return tf.data.Dataset.from_tensor_slices((images_t, labels_t)).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    order = index_dataset(RandomSampler(n, seed=seed), with_seeds=False)  # default_rng([seed, e]).permutation(n)
    ds = order.batch(batch_size).map(lambda idx: (tf.gather(images_t, idx), tf.gather(labels_t, idx)))
    ds = ds.apply(tf.data.experimental.assert_cardinality(math.ceil(n / batch_size)))
    return ds.prefetch(tf.data.AUTOTUNE)


class TrainingInputs(NamedTuple):
    """The training pipeline of a run and what ``fit`` needs with it.

    Attributes:
        dataset: batches of ``(images, labels)``; each new iteration is the next epoch.
        steps_per_epoch: batches per epoch.
        callbacks: callbacks the sampler needs during ``fit`` (the embedded
            samplers' :class:`~detreg_keras.data.PoolEmbeddingRefresh`), else empty.
        reproducible: the batches are a function of the seed and the epoch
            only, so a resumed run can skip to its epoch (:func:`skip_epochs`);
            ``False`` for the embedded samplers, whose batches depend on the
            stored embeddings.
    """

    dataset: tf.data.Dataset
    steps_per_epoch: int
    callbacks: tuple[keras.callbacks.Callback, ...] = ()
    reproducible: bool = True


#: ``TrainConfig.sampler`` name -> embedded sampler class (Roth et al. 2020).
_EMBEDDED = {"greedy_coreset": GreedyCoresetSampler, "ddm": DDMSampler, "frd": FRDSampler}


def make_training_inputs(
    source: Source, cfg: TrainConfig, labels: np.ndarray | None = None, stats: DecodeStats | None = None
) -> TrainingInputs:
    """The training pipeline of ``cfg``, its batches per epoch and the callbacks its sampler needs.

    Each new iteration of the dataset is the next epoch (a new order and new
    augmentations), which :func:`run_training` uses to skip the epochs already
    trained when a run resumes.

    ``cfg.sampler``: ``random`` and ``m_per_class`` as in
    :func:`~detreg_keras.data.make_train_dataset`; ``spc_r`` is
    :class:`~detreg_keras.data.SPCRSampler`; ``greedy_coreset``, ``ddm`` and
    ``frd`` are the embedded samplers (groups of ``cfg.samples_per_class``,
    ``cfg.sampler_candidates`` candidates for DDM / FRD) over an
    :class:`~detreg_keras.data.EmbeddingStore` that the returned
    :class:`~detreg_keras.data.PoolEmbeddingRefresh` fills at train begin and
    every ``cfg.sampler_refresh_epochs`` epochs, embedding every training image
    with the evaluation transform (:func:`make_evaluation_data`), in label order.

    Args:
        source: the training split.
        cfg: batch size, sampler, image size, augmentation, seed.
        labels: ``source_labels(source)`` if already known (saves a pass over
            a tfds split).
        stats: optional :class:`DecodeStats` counting unreadable training images.

    Raises:
        ValueError: for an empty split or a batch the sampler cannot fill.
    """
    labels = source_labels(source) if labels is None else np.asarray(labels)
    if labels.size == 0:
        raise ValueError("The training set is empty: no images to train on.")
    if cfg.sampler in ("random", "m_per_class"):
        return TrainingInputs(*_label_sampler_data(source, cfg, labels, stats))
    sampler, callbacks = _index_sampler(source, cfg, labels)
    if isinstance(source, tuple):
        x, y = (tf.constant(a) for a in (source[0].astype("float32"), source[1].astype("int32")))
        order = index_dataset(sampler, with_seeds=False)
        ds = order.map(lambda idx: (tf.gather(x, idx), tf.gather(y, idx))).prefetch(tf.data.AUTOTUNE)
    else:
        ds = make_train_dataset(
            source, None, cfg.image_size, sampler=sampler, seed=cfg.seed,
            scale=(cfg.crop_scale_min, 1.0), flip=cfg.flip, stats=stats,
        )  # fmt: skip
        ds = with_channels(ds, cfg.channels)
    return TrainingInputs(ds, len(sampler), callbacks, reproducible=not callbacks)


def make_training_data(
    source: Source, cfg: TrainConfig, labels: np.ndarray | None = None, stats: DecodeStats | None = None
) -> tuple[tf.data.Dataset, int]:
    """``(dataset, steps_per_epoch)`` of :func:`make_training_inputs`, for samplers that need no callback.

    A thin alias kept for its callers: :func:`make_training_inputs` is the one
    implementation (and the one way for new code); this only unpacks its result.

    Raises:
        ValueError: for an embedded sampler (its dataset needs the
            :class:`~detreg_keras.data.PoolEmbeddingRefresh` that only
            :func:`make_training_inputs` returns).
    """
    if cfg.sampler in _EMBEDDED:
        raise ValueError(
            f"sampler={cfg.sampler!r} needs its pool-refresh callback during fit: "
            "use make_training_inputs(...), which returns it in .callbacks."
        )
    inputs = make_training_inputs(source, cfg, labels, stats)
    return inputs.dataset, inputs.steps_per_epoch


def _label_sampler_data(
    source: Source, cfg: TrainConfig, labels: np.ndarray, stats: DecodeStats | None
) -> tuple[tf.data.Dataset, int]:
    """``random`` / ``m_per_class`` batches (arrays: shuffled batches whatever the sampler)."""
    if isinstance(source, tuple):
        x, y = source
        steps = math.ceil(len(x) / cfg.batch_size)
        return make_array_dataset(x, y, cfg.batch_size, shuffle=True, seed=cfg.seed), steps
    steps = _steps_per_epoch(labels, cfg)
    ds = make_train_dataset(
        source,
        cfg.batch_size,
        cfg.image_size,
        sampler=cfg.sampler,
        samples_per_class=cfg.samples_per_class if cfg.sampler == "m_per_class" else None,
        seed=cfg.seed,
        scale=(cfg.crop_scale_min, 1.0),
        flip=cfg.flip,
        stats=stats,
    )
    return with_channels(ds, cfg.channels), steps


def _index_sampler(
    source: Source, cfg: TrainConfig, labels: np.ndarray
) -> tuple[Sampler, tuple[keras.callbacks.Callback, ...]]:
    """The ``spc_r`` or embedded sampler of ``cfg`` over ``labels`` and the callbacks it needs."""
    if cfg.sampler == "spc_r":
        return SPCRSampler(labels, cfg.batch_size, seed=cfg.seed), ()
    if cfg.sampler not in _EMBEDDED:
        raise ValueError(f"Unknown sampler {cfg.sampler!r}; valid samplers: {', '.join(SAMPLERS)}.")
    store = EmbeddingStore(len(labels))
    options = {} if cfg.sampler == "greedy_coreset" else {"num_candidates": cfg.sampler_candidates}
    sampler = _EMBEDDED[cfg.sampler](
        labels, cfg.batch_size, store, samples_per_class=cfg.samples_per_class, seed=cfg.seed, **options
    )
    pool = make_evaluation_data(source, cfg)[0]  # every training image, in label order, none dropped
    if isinstance(pool, tuple):
        pool = pool[0]
    refresh = PoolEmbeddingRefresh(
        store, pool, every_n_epochs=cfg.sampler_refresh_epochs, batch_size=cfg.eval_batch_size
    )
    return sampler, (refresh,)


def _steps_per_epoch(labels: np.ndarray, cfg: TrainConfig) -> int:
    """Batches per epoch of ``cfg.sampler`` over ``labels`` (a clear error for a batch it cannot fill)."""
    if cfg.sampler == "m_per_class":
        return m_per_class_steps(labels, class_groups(cfg.batch_size, cfg.samples_per_class), cfg.samples_per_class)
    steps = len(labels) // cfg.batch_size
    if steps == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the training set ({len(labels)} images).")
    return steps


def make_evaluation_data(
    source: Source, cfg: TrainConfig, stats: DecodeStats | None = None
) -> tuple[Any, int | None]:
    """Evaluation data for :func:`detreg_keras.evaluation.embed` and its number of batches (if known).

    ``stats`` (optional) counts the images the pipeline drops as unreadable.
    """
    if isinstance(source, tuple):
        x, y = source
        return (x.astype("float32"), y), math.ceil(len(x) / cfg.eval_batch_size)
    ds = make_eval_dataset(
        source, cfg.eval_batch_size, cfg.image_size, resize_size=cfg.resize_size, mode=cfg.eval_mode, stats=stats
    )
    total = math.ceil(len(source) / cfg.eval_batch_size) if isinstance(source, ImageRecords) else None
    return with_channels(ds, cfg.channels), total


def report_dropped(stats: DecodeStats, what: str) -> int:
    """Prints one ``warning:`` line (stderr) if the pipeline counted by ``stats`` dropped images.

    The pipelines skip images that fail to decode (e.g. a JPEG cut off in a copy:
    its header passes the listing check, its data does not decode), so that a
    bad file does not stop a run; this makes every such drop visible once the
    iteration has finished.

    Args:
        stats: the :class:`DecodeStats` passed to the pipeline.
        what: what was read, for the message (``"test images"``).

    Returns:
        The number of dropped images.
    """
    dropped = stats.dropped
    if dropped > 0:
        print(f"warning: {what}: {stats.summary()}; those files are unreadable (re-copy or remove them).",
              file=sys.stderr, flush=True)  # fmt: skip
    return dropped


def skip_epochs(ds: tf.data.Dataset, epochs: int) -> None:
    """Moves a training pipeline ``epochs`` epochs ahead (one batch read per epoch)."""
    for _ in range(epochs):
        for _ in ds.take(1):
            pass


def describe(source: Source, labels: np.ndarray | None = None) -> str:
    """``"2720 images of 136 classes"`` (a tfds split is not read for it: ``"a tfds split"``)."""
    if labels is None and isinstance(source, tf.data.Dataset):
        return "a tfds split"
    labels = source_labels(source) if labels is None else labels
    return f"{len(labels):,} images of {len(np.unique(labels)):,} classes"
