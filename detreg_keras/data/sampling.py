"""Batch samplers: m-per-class (P classes x m samples) and plain random.

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

Random semantics (:class:`RandomSampler`): each epoch is a fresh permutation
of all images, to be cut into batches by the pipeline (the last, short batch
is dropped when ``drop_remainder``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

_SEED_MAX = 2**31 - 1


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
        self.classes, inverse = np.unique(labels, return_inverse=True)
        if len(self.classes) < classes_per_batch:
            raise ValueError(
                f"m-per-class sampling needs at least classes_per_batch={classes_per_batch} "
                f"classes, but the labels hold {len(self.classes)}."
            )
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=len(self.classes))
        self._members = np.split(order, np.cumsum(counts)[:-1])
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


Sampler = MPerClassSampler | RandomSampler


def m_per_class_steps(
    labels: Sequence[int] | np.ndarray, classes_per_batch: int, samples_per_class: int
) -> int:
    """Batches per epoch of :class:`MPerClassSampler` (``steps_per_epoch``)."""
    return len(MPerClassSampler(labels, classes_per_batch, samples_per_class))


def epoch_seeds(sampler: Sampler, epoch: int, shape: tuple[int, ...]) -> np.ndarray:
    """Stateless-random seeds for the augmentations of one epoch.

    Args:
        sampler: supplies the base seed.
        epoch: epoch number.
        shape: shape of the epoch's index plan.

    Returns:
        ``int64`` array ``shape + (2,)`` from ``default_rng([seed, epoch, 1])``.
    """
    rng = np.random.default_rng([sampler.seed, int(epoch), 1])
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

    Args:
        sampler: the index sampler.
        repeat: loop over epochs forever.
        on_epoch: called with the epoch number before each plan is made.

    Returns:
        Elements ``(int64 [], int64 indices, int64 seeds)``: indices ``[N]``
        (:class:`RandomSampler`) or ``[batches, P * m]``
        (:class:`MPerClassSampler`), seeds ``indices.shape + (2,)``.
    """
    import tensorflow as tf  # noqa: PLC0415

    plans = iter_epochs(sampler, True, {"epoch": 0}, on_epoch)  # one next() per epoch element

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
        Elements ``indices`` or ``(indices, seeds)``.
    """
    import tensorflow as tf  # noqa: PLC0415

    def split(_: tf.Tensor, indices: tf.Tensor, seeds: tf.Tensor) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((indices, seeds) if with_seeds else indices)

    return plan_dataset(sampler, repeat).flat_map(split)
