"""Label batch samplers: m-per-class (P classes x m samples), SPC-R and plain random.

The samplers are **NumPy index generators**: ``sampler.epoch_indices(e)``
returns the whole index plan of epoch ``e`` as an array, computed from
``numpy.random.default_rng([seed, e])``, so a plan depends only on the seed and
the epoch number (never on how far an iterator got). :func:`plan_dataset`
makes one epoch plan per ``tf.numpy_function`` call and :func:`index_dataset`
splits it into elements in the graph, so the Python side runs once per epoch,
not once per image.

m-per-class semantics (:class:`MPerClassSampler`), with ``P =
classes_per_batch`` and ``m = samples_per_class``:

* Each class ``c`` with ``n_c`` images is cut into ``k_c = ceil(n_c / m)``
  *chunks* of exactly ``m`` indices: its images are shuffled and split in
  order, and the last, short chunk is topped up with other images of the same
  class drawn at random (without repetition inside the chunk when
  ``n_c >= m``; a class with ``n_c < m`` gets all its images plus ``m - n_c``
  drawn with replacement). **Every image therefore appears at least once per
  epoch, and every class at least once.**
* Every batch holds ``P`` chunks of ``P`` *different* classes, i.e. exactly
  ``m`` images of each of its ``P`` classes (batch size ``P * m``). Chunks are
  placed greedily, the classes with the most chunks left first (ties broken at
  random), which needs exactly ``max(ceil(sum_c k_c / P), max_c k_c)``
  batches. Slots left over in the last batches are filled with extra chunks
  of randomly chosen classes not yet in that batch.
* Epoch length is therefore :meth:`MPerClassSampler.__len__` batches,
  the same every epoch; order, chunks and fillers change with the epoch.

SPC-R semantics (:class:`SPCRSampler`, Roth et al. 2020, "Revisiting
Training Strategies and Generalization Performance in Deep Metric Learning",
data sampling): each batch is ``batch_size - 1`` distinct examples drawn uniformly at
random plus one more example of the label of one of them (:func:`spc_r_batch`),
so every batch holds at least one same-class pair; ``len(sampler)`` is
``num_examples // batch_size`` batches per epoch.

The embedding-driven samplers of the same paper (greedy coreset, DDM, FRD)
live in :mod:`detreg_keras.data.embedded_sampling`; they plan *one batch at a
time* (``sampler.batch_indices(epoch, step)``) so that each batch reads the
latest stored embeddings, and :func:`plan_dataset` then makes one element per
batch instead of one per epoch.

Random semantics (:class:`RandomSampler`): each epoch is a fresh permutation
of all images, to be cut into batches by the pipeline (the last, short batch
is dropped when ``drop_remainder``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

_SEED_MAX = 2**31 - 1


def class_members(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """``(classes, inverse, members)``: sorted distinct labels, each example's class
    number, and the example indices of each class (ascending)."""
    classes, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(classes))
    return classes, inverse, np.split(order, np.cumsum(counts)[:-1])


def class_groups(batch_size: int, samples_per_class: int, min_batch_size: int = 1) -> int:
    """``P = batch_size / m``, the class groups of a batch, checked.

    Raises:
        ValueError: ``m < 1``, ``batch_size < min_batch_size`` or ``batch_size`` not a multiple of ``m``.
    """
    if samples_per_class < 1 or batch_size < min_batch_size or batch_size % samples_per_class:
        raise ValueError(
            f"batch_size={batch_size} must be >= {min_batch_size} and a multiple of "
            f"samples_per_class={samples_per_class} (>= 1)."
        )
    return batch_size // samples_per_class


def check_class_count(num_classes: int, classes_per_batch: int, samples_per_class: int, who: str) -> None:
    """Checks that the labels hold the ``classes_per_batch`` distinct classes a batch draws.

    Raises:
        ValueError: fewer classes than ``classes_per_batch`` (the message names ``who``).
    """
    if num_classes < classes_per_batch:
        raise ValueError(
            f"{who} needs at least classes_per_batch={classes_per_batch} classes (batches of "
            f"{classes_per_batch} distinct classes x {samples_per_class}), but the labels hold only "
            f"{num_classes} classes; use a smaller batch_size or a larger samples_per_class."
        )


class MPerClassSampler:
    """Class-balanced batches of ``classes_per_batch`` x ``samples_per_class``.

    Args:
        labels: integer label of each example (any ids; a class is a distinct
            value).
        classes_per_batch: ``P``, distinct classes in every batch.
        samples_per_class: ``m``, images of each of those classes per batch.
        seed: base seed; epoch ``e`` uses ``default_rng([seed, e])``.

    Raises:
        ValueError: if there are fewer than ``P`` classes or ``P, m < 1``.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        classes_per_batch: int,
        samples_per_class: int,
        seed: int = 0,
    ) -> None:
        if classes_per_batch < 1 or samples_per_class < 1:
            raise ValueError("classes_per_batch and samples_per_class must be >= 1.")
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.classes, _, self._members = class_members(labels)
        check_class_count(len(self.classes), classes_per_batch, samples_per_class, "m-per-class sampling")
        counts = np.array([len(m) for m in self._members])
        self.classes_per_batch = int(classes_per_batch)
        self.samples_per_class = int(samples_per_class)
        self.seed = int(seed)
        self._chunks = np.array(
            [math.ceil(n / self.samples_per_class) for n in counts], dtype=np.int64
        )
        self.num_examples = int(labels.size)

    @property
    def batch_size(self) -> int:
        """``P * m``."""
        return self.classes_per_batch * self.samples_per_class

    def __len__(self) -> int:
        """Batches per epoch: ``max(ceil(sum_c k_c / P), max_c k_c)``."""
        total = int(self._chunks.sum())
        return max(math.ceil(total / self.classes_per_batch), int(self._chunks.max()))

    def _class_chunks(self, members: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        m = self.samples_per_class
        perm = rng.permutation(members)
        n = len(perm)
        if n < m:
            return [np.concatenate([perm, rng.choice(members, size=m - n, replace=True)])]
        chunks = [perm[i : i + m] for i in range(0, n - n % m, m)]
        if n % m:
            tail = perm[n - n % m :]
            others = rng.choice(perm[: n - n % m], size=m - len(tail), replace=False)
            chunks.append(np.concatenate([tail, others]))
        return chunks

    def _extra_chunk(self, members: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        m = self.samples_per_class
        return rng.choice(members, size=m, replace=len(members) < m)

    def epoch_indices(self, epoch: int = 0) -> np.ndarray:
        """The index plan of one epoch.

        Args:
            epoch: epoch number (part of the random seed).

        Returns:
            ``int64`` array ``[len(self), P * m]``: row ``b`` lists the example
            indices of batch ``b``, class by class (``m`` consecutive entries
            per class).
        """
        rng = np.random.default_rng([self.seed, int(epoch)])
        pending = [self._class_chunks(mem, rng) for mem in self._members]
        remaining = np.array([len(c) for c in pending], dtype=np.int64)
        num_classes = len(pending)
        p = self.classes_per_batch
        batches = np.empty((len(self), self.batch_size), dtype=np.int64)
        for b in range(len(self)):
            tiebreak = rng.random(num_classes)
            order = np.lexsort((tiebreak, -remaining))
            chosen = [int(c) for c in order[:p] if remaining[c] > 0]
            if len(chosen) < p:
                free = np.setdiff1d(np.arange(num_classes), chosen)
                chosen += rng.choice(free, size=p - len(chosen), replace=False).tolist()
            rows = []
            for c in chosen:
                if remaining[c] > 0:
                    remaining[c] -= 1
                    rows.append(pending[c][remaining[c]])
                else:
                    rows.append(self._extra_chunk(self._members[c], rng))
            batches[b] = np.concatenate(rows)
        if remaining.any():  # cannot happen: the greedy order is optimal
            raise AssertionError("MPerClassSampler left chunks unplaced.")
        return batches

def spc_r_batch(
    labels: Sequence[int] | np.ndarray, batch_size: int, rng: np.random.Generator
) -> np.ndarray:
    """One SPC-R batch (Roth et al. 2020, data sampling): random examples plus one same-class partner.

    ``batch_size - 1`` distinct examples are drawn uniformly without
    replacement; the last example is an undrawn example sharing the label of
    one of them (that one chosen uniformly among those whose class has an
    undrawn member). When no drawn example has such a partner left, either the
    batch already holds a same-class pair (then the last example is any undrawn
    one), or every drawn example is alone in its class and the first one is
    swapped for an example of a class with at least two members before its
    partner is added.

    Args:
        labels: integer label of each example.
        batch_size: examples per batch, ``2 <= batch_size <= len(labels)``.
        rng: the random generator.

    Returns:
        ``int64 [batch_size]`` distinct example indices holding at least one
        pair of examples with the same label.

    Raises:
        ValueError: for ``batch_size < 2``, more than ``len(labels)``, or
            labels in which no class has two examples.
    """
    labels = np.asarray(labels).reshape(-1)
    n = labels.size
    if batch_size < 2 or batch_size > n:
        raise ValueError(
            f"SPC-R needs 2 <= batch_size <= number of examples ({n}), got batch_size={batch_size}."
        )
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if counts.max() < 2:
        raise ValueError(
            f"SPC-R needs a class with at least 2 examples for its same-class partner, "
            f"but all {len(classes)} classes hold a single example."
        )
    batch = rng.choice(n, size=batch_size - 1, replace=False)
    drawn = np.zeros(n, dtype=bool)
    drawn[batch] = True
    undrawn_per_class = np.bincount(inverse[~drawn], minlength=len(classes))
    anchors = batch[undrawn_per_class[inverse[batch]] > 0]
    if len(anchors) == 0:
        if (np.bincount(inverse[batch], minlength=len(classes)) >= 2).any():
            extra = rng.choice(np.flatnonzero(~drawn))
            return np.append(batch, extra).astype(np.int64)
        # every drawn example is alone in its class: swap the first for a pairable one
        pairable = np.flatnonzero(~drawn & (counts[inverse] >= 2))
        drawn[batch[0]] = False
        batch[0] = rng.choice(pairable)
        drawn[batch[0]] = True
        anchors = batch[:1]
    anchor = rng.choice(anchors)
    partners = np.flatnonzero(~drawn & (inverse == inverse[anchor]))
    return np.append(batch, rng.choice(partners)).astype(np.int64)


class SPCRSampler:
    """SPC-R batches (:func:`spc_r_batch`): random examples with one guaranteed same-class pair.

    Args:
        labels: integer label of each example.
        batch_size: examples per batch (at least 2).
        seed: base seed; epoch ``e`` uses ``default_rng([seed, e])``.
        steps_per_epoch: batches per epoch; default ``num_examples // batch_size``.

    Raises:
        ValueError: as :func:`spc_r_batch` (checked here, not at the first batch).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        seed: int = 0,
        steps_per_epoch: int | None = None,
    ) -> None:
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        spc_r_batch(self.labels, batch_size, np.random.default_rng(0))  # validates
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_examples = int(self.labels.size)
        self.steps_per_epoch = check_steps(steps_per_epoch, self.num_examples // self.batch_size)

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.steps_per_epoch

    def epoch_indices(self, epoch: int = 0) -> np.ndarray:
        """The index plan of one epoch: ``int64 [len(self), batch_size]``, one SPC-R batch a row."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        return np.stack([spc_r_batch(self.labels, self.batch_size, rng) for _ in range(len(self))])


def check_steps(steps_per_epoch: int | None, default: int) -> int:
    """``steps_per_epoch`` (or ``default``), checked to be at least 1.

    Raises:
        ValueError: when the result is below 1 (e.g. a batch larger than the data).
    """
    steps = default if steps_per_epoch is None else int(steps_per_epoch)
    if steps < 1:
        raise ValueError(
            f"an epoch needs at least one batch, got steps_per_epoch={steps} "
            "(pass steps_per_epoch, or a batch_size no larger than the number of examples)."
        )
    return steps


class RandomSampler:
    """Uniformly shuffled examples, a new permutation each epoch.

    Args:
        num_examples: dataset size.
        seed: base seed; epoch ``e`` uses ``default_rng([seed, e])``.
    """

    def __init__(self, num_examples: int, seed: int = 0) -> None:
        if num_examples < 1:
            raise ValueError("RandomSampler needs at least one example.")
        self.num_examples = int(num_examples)
        self.seed = int(seed)

    def __len__(self) -> int:
        """Examples per epoch."""
        return self.num_examples

    def epoch_indices(self, epoch: int = 0) -> np.ndarray:
        """A permutation of ``range(num_examples)``, ``int64 [num_examples]``."""
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_examples)


class Sampler(Protocol):
    """What :func:`plan_dataset` needs of an index sampler.

    A sampler may also define ``batch_indices(epoch, step) -> int64 [batch_size]``
    (the embedded samplers do); :func:`plan_dataset` then plans one batch at a time.
    """

    seed: int
    num_examples: int

    def __len__(self) -> int: ...

    def epoch_indices(self, epoch: int = 0) -> np.ndarray: ...


def m_per_class_steps(
    labels: Sequence[int] | np.ndarray, classes_per_batch: int, samples_per_class: int
) -> int:
    """Batches per epoch of :class:`MPerClassSampler` (``steps_per_epoch``)."""
    return len(MPerClassSampler(labels, classes_per_batch, samples_per_class))


def epoch_seeds(
    sampler: Sampler, epoch: int, shape: tuple[int, ...], step: int | None = None
) -> np.ndarray:
    """Stateless-random seeds for the augmentations of one epoch (or one batch of it).

    Args:
        sampler: supplies the base seed.
        epoch: epoch number.
        shape: shape of the epoch's (or the batch's) index plan.
        step: batch number, for samplers planned one batch at a time.

    Returns:
        ``int64`` array ``shape + (2,)`` from ``default_rng([seed, epoch, 1])``
        (``[seed, epoch, 1, step]`` for one batch).
    """
    key = [sampler.seed, int(epoch), 1] + ([] if step is None else [int(step)])
    rng = np.random.default_rng(key)
    return rng.integers(0, _SEED_MAX, size=(*shape, 2), dtype=np.int64)


def iter_epochs(
    sampler: Sampler,
    repeat: bool,
    state: dict[str, int],
    on_epoch: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yields ``(epoch, indices, seeds)`` plans (:func:`plan_dataset` draws one per epoch).

    Args:
        sampler: the index sampler.
        repeat: go on forever; otherwise stop after one epoch.
        state: mutable ``{"epoch": e}``; the next plan is epoch ``e``. Shared
            between calls so that each new iteration of a one-epoch dataset
            moves on to the next epoch.
        on_epoch: called with the epoch number before each plan is made.
    """
    while True:
        epoch = state["epoch"]
        state["epoch"] = epoch + 1
        if on_epoch is not None:
            on_epoch(epoch)
        indices = sampler.epoch_indices(epoch)
        yield epoch, indices, epoch_seeds(sampler, epoch, indices.shape)
        if not repeat:
            return


def iter_batch_plans(
    sampler: Sampler,
    state: dict[str, int],
    on_epoch: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yields ``(epoch, indices [1, B], seeds [1, B, 2])``, one batch at a time, forever.

    For samplers with ``batch_indices(epoch, step)`` (the embedded samplers):
    batch ``k`` overall is step ``k % len(sampler)`` of epoch ``k // len(sampler)``.

    Args:
        sampler: the index sampler.
        state: mutable ``{"batch": k}``, the next batch overall.
        on_epoch: called with the epoch number before its first batch is planned.
    """
    while True:
        epoch, step = divmod(state["batch"], len(sampler))
        state["batch"] += 1
        if step == 0 and on_epoch is not None:
            on_epoch(epoch)
        rows = np.asarray(sampler.batch_indices(epoch, step), dtype=np.int64)[None]
        yield epoch, rows, epoch_seeds(sampler, epoch, rows.shape, step)


def plan_dataset(
    sampler: Sampler,
    repeat: bool = False,
    on_epoch: Callable[[int], None] | None = None,
) -> tf.data.Dataset:
    """A tf.data dataset with one element per epoch: ``(epoch, indices, seeds)``.

    Each element is made by one ``tf.numpy_function`` call (:func:`iter_epochs`'
    plan: ``sampler.epoch_indices(epoch)`` and :func:`epoch_seeds`), so Python
    runs once per epoch. This deliberately avoids ``Dataset.from_generator``:
    a pipeline fed by ``from_generator`` decoded images at about half the
    throughput per CPU-second of the same pipeline fed by ``numpy_function`` /
    ``from_tensor_slices`` (TF 2.21, measured in ``bench/bench_tfdata.py``).

    With ``repeat=False`` the dataset is one epoch long, and *each new
    iteration* (e.g. each Keras epoch) moves on to the next epoch's plan; with
    ``repeat=True`` it runs through epochs ``0, 1, 2, ...`` forever. A new
    dataset always starts at epoch 0, so runs are reproducible from ``seed``.

    A sampler with ``batch_indices(epoch, step)`` is planned one batch at a
    time instead (:func:`iter_batch_plans`; one Python call per batch): each
    element is one batch, ``indices [1, B]``, and a one-epoch dataset is
    ``len(sampler)`` elements long.

    Args:
        sampler: the index sampler.
        repeat: loop over epochs forever.
        on_epoch: called with the epoch number before each plan is made.

    Returns:
        Elements ``(int64 [], int64 indices, int64 seeds)``: indices ``[N]``
        (:class:`RandomSampler`), ``[batches, B]`` (:class:`MPerClassSampler`,
        :class:`SPCRSampler`) or ``[1, B]`` (one batch, ``batch_indices``
        samplers), seeds ``indices.shape + (2,)``.
    """
    import tensorflow as tf  # noqa: PLC0415

    per_batch = hasattr(sampler, "batch_indices")
    plans = (  # one next() per element
        iter_batch_plans(sampler, {"batch": 0}, on_epoch)
        if per_batch
        else iter_epochs(sampler, True, {"epoch": 0}, on_epoch)
    )

    def next_plan(_: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        epoch, indices, seeds = next(plans)
        return np.int64(epoch), indices.astype(np.int64), seeds

    row = [None] if isinstance(sampler, RandomSampler) else [None, sampler.batch_size]

    def plan(token: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        epoch, indices, seeds = tf.numpy_function(
            next_plan, [token], (tf.int64, tf.int64, tf.int64), stateful=True, name="epoch_plan"
        )
        epoch.set_shape([])
        indices.set_shape(row)
        seeds.set_shape([*row, 2])
        return epoch, indices, seeds

    if per_batch and not repeat:
        start = tf.data.Dataset.range(len(sampler))
    else:
        start = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64))
        if repeat:
            start = start.repeat()
    return start.map(plan)


def index_dataset(
    sampler: Sampler, repeat: bool = False, with_seeds: bool = True
) -> tf.data.Dataset:
    """A tf.data dataset of sampler indices (and per-example random seeds).

    One epoch plan at a time (:func:`plan_dataset`, whose epoch semantics it
    keeps), split into elements in the graph: scalars for a
    :class:`RandomSampler` and ``[P * m]`` index rows for an
    :class:`MPerClassSampler`.

    Args:
        sampler: the index sampler.
        repeat: loop over epochs forever.
        with_seeds: also yield ``int64`` stateless-random seeds of shape
            ``indices.shape + (2,)`` (see :func:`epoch_seeds`) for the random
            augmentations.

    Returns:
        Elements ``indices`` or ``(indices, seeds)``; a one-epoch dataset
        declares its length (``len(sampler)`` elements).
    """
    import tensorflow as tf  # noqa: PLC0415

    def split(_: tf.Tensor, indices: tf.Tensor, seeds: tf.Tensor) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((indices, seeds) if with_seeds else indices)

    ds = plan_dataset(sampler, repeat).flat_map(split)
    # flat_map hides the length; Keras needs it to end epoch 1 without a "ran out of data" warning
    return ds if repeat else ds.apply(tf.data.experimental.assert_cardinality(len(sampler)))
