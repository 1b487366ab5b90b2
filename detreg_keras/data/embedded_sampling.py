"""Embedded batch samplers of Roth et al. 2020: greedy coreset, DDM and FRD matching.

Roth, Milbich, Sinha, Gupta, Ommer, Cohen, "Revisiting Training Strategies and
Generalization Performance in Deep Metric Learning" (ICML 2020), data sampling,
*embedded samplers*: batches are built from the current embeddings of the
training examples so that each batch covers the data's statistics.

* **Greedy coreset** (:func:`greedy_coreset`): from a random pool, add the
  example farthest (Euclidean) from those already chosen (k-center greedy).
* **DDM** (:func:`ddm_select`): among ``m`` random candidate batches, the one
  whose normalised histogram of pairwise distances is closest, in 1-D
  Wasserstein distance, to the histogram of the stored pool.
* **FRD** (:func:`frd_select`): the same with the Frechet distance between the
  Gaussians fitted to the batch and to the pool,
  ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

The pure functions take NumPy arrays. The samplers (:class:`GreedyCoresetSampler`,
:class:`DDMSampler`, :class:`FRDSampler`) read the embeddings from an
:class:`EmbeddingStore`, which a :class:`PoolEmbeddingRefresh` callback fills
at the start of training and refreshes every ``N`` steps or epochs. A sampler
plans one batch at a time (``batch_indices(epoch, step)``, see
:func:`detreg_keras.data.sampling.plan_dataset`), from the last stored
snapshot: a refresh replaces the store's array in one step, so the input
pipeline never waits for it and never reads a half-written pool (tf.data
plans a few batches ahead, so a refresh reaches the batches a few steps later). Batches
depend on the seed *and* on the stored embeddings, hence on when refreshes
land: unlike the label samplers, a run is not reproducible batch for batch.

With ``samples_per_class = m > 1`` a batch is ``P = batch_size / m`` groups of
``m`` examples of one class, as in the paper's code: greedy coreset picks the
``P`` group anchors and adds ``m - 1`` random examples of each anchor's class;
DDM and FRD draw candidates of ``P`` distinct random classes x ``m`` examples.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:  # typing.Unpack is Python >= 3.11; annotations are strings here
    from typing_extensions import Unpack

import keras
import numpy as np
import tensorflow as tf
from threadpoolctl import ThreadpoolController

from detreg_keras.data.sampling import check_class_count, check_steps, class_groups, class_members

__all__ = [
    "DDMSampler",
    "EmbeddingStore",
    "FRDSampler",
    "GaussianStats",
    "GreedyCoresetSampler",
    "PoolEmbeddingRefresh",
    "check_embeddings",
    "ddm_costs",
    "ddm_select",
    "distance_histogram",
    "frd_costs",
    "frd_select",
    "gaussian_stats",
    "greedy_coreset",
    "histogram_wasserstein",
    "pairwise_distances",
]


# ----------------------------------------------------------------------------- pure functions


def check_embeddings(embeddings: Any, name: str = "embeddings") -> np.ndarray:
    """``embeddings`` as a finite ``float64 [n, d]`` array.

    Raises:
        ValueError: for a non-2-D or empty array, or non-finite entries (naming
            how many rows hold them and the first one).
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [n, d] array, got shape {x.shape}.")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise ValueError(
            f"{name} hold non-finite values (NaN or inf) in {bad.size} of {x.shape[0]} rows, "
            f"first at row {bad[0]}: the model diverged or an input is broken; "
            "refresh the pool with a finite model before sampling from it."
        )
    return x


def greedy_coreset(
    embeddings: np.ndarray,
    k: int,
    first: int | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Greedy coreset (k-center greedy): each new point is the farthest from those chosen.

    Starting from ``first``, step ``t`` adds ``argmax_i min_{j chosen} ||x_i - x_j||``
    (the first such ``i`` on ties; points already chosen are never chosen
    again, even among duplicates). The chosen set's covering radius is at most
    twice the optimal k-center radius.

    Args:
        embeddings: ``[n, d]`` points.
        k: points to choose, ``1 <= k <= n``.
        first: index of the first point; drawn from ``rng`` when ``None``.
        rng: random generator for ``first`` (default ``default_rng()``).

    Returns:
        ``int64 [k]`` distinct indices in the order chosen.

    Raises:
        ValueError: for ``k`` outside ``[1, n]``, ``first`` outside ``[0, n)``
            or non-finite embeddings.
    """
    x = check_embeddings(embeddings)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"greedy_coreset needs 1 <= k <= {n} (the number of points), got k={k}.")
    if first is None:
        first = int((rng or np.random.default_rng()).integers(n))
    if not 0 <= first < n:
        raise ValueError(f"first={first} is not a point index in [0, {n}).")
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = first
    nearest = np.sum((x - x[first]) ** 2, axis=1)
    nearest[first] = -1.0
    for t in range(1, k):
        chosen[t] = np.argmax(nearest)
        nearest = np.minimum(nearest, np.sum((x - x[chosen[t]]) ** 2, axis=1))
        nearest[chosen[: t + 1]] = -1.0
    return chosen


def pairwise_distances(embeddings: np.ndarray) -> np.ndarray:
    """Euclidean distances of all pairs ``i < j``, ``float64 [n (n - 1) / 2]`` (row-major)."""
    x = check_embeddings(embeddings)
    sq = np.sum(x * x, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    iu = np.triu_indices(x.shape[0], 1)
    return np.sqrt(np.clip(d2[iu], 0.0, None))


def distance_histogram(
    embeddings: np.ndarray, bins: int = 50, edges: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised histogram of the pairwise distances of ``embeddings``.

    Args:
        embeddings: ``[n, d]``, ``n >= 2``.
        bins: number of equal bins over ``[min, max]`` of the distances
            (when ``edges`` is ``None``).
        edges: fixed bin edges (e.g. a reference histogram's); distances
            outside them are clipped into the first or last bin, so no mass is lost.

    Returns:
        ``(weights [bins], edges [bins + 1])``, weights summing to 1.

    Raises:
        ValueError: for fewer than 2 points, ``bins < 1`` or non-finite input.
    """
    x = check_embeddings(embeddings)
    if x.shape[0] < 2:
        raise ValueError(f"a distance histogram needs at least 2 points, got {x.shape[0]}.")
    dist = pairwise_distances(x)
    if edges is None:
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}.")
        lo, hi = float(dist.min()), float(dist.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    edges = np.asarray(edges, dtype=np.float64)
    counts, _ = np.histogram(np.clip(dist, edges[0], edges[-1]), bins=edges)
    return counts / counts.sum(), edges


def histogram_wasserstein(p: np.ndarray, q: np.ndarray, edges: np.ndarray) -> float:
    """1-D Wasserstein-1 distance between two histograms on the same bins.

    The mass of each bin sits at its centre, so
    ``W1 = sum_i |P_i - Q_i| * (c_{i+1} - c_i)`` with ``P, Q`` the cumulative sums.

    Args:
        p: weights ``[bins]`` (normalised here).
        q: weights ``[bins]`` (normalised here).
        edges: ``[bins + 1]`` bin edges.

    Returns:
        The distance, in the units of the edges.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    centres = 0.5 * (edges[1:] + edges[:-1])
    cdf_gap = np.abs(np.cumsum(p / p.sum()) - np.cumsum(q / q.sum()))[:-1]
    return float(np.sum(cdf_gap * np.diff(centres)))


def ddm_costs(
    candidates: Sequence[np.ndarray] | np.ndarray,
    reference_histogram: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """DDM cost of each candidate batch: :func:`histogram_wasserstein` to the reference histogram.

    Args:
        candidates: ``m`` candidate batches, each ``[b, d]`` (``b >= 2``).
        reference_histogram: ``(weights, edges)`` from :func:`distance_histogram`
            of the reference (the pool); the candidates use its edges.

    Returns:
        ``float64 [m]`` costs.
    """
    weights, edges = reference_histogram
    return np.array(
        [
            histogram_wasserstein(distance_histogram(c, edges=edges)[0], weights, edges)
            for c in _check_candidates(candidates)
        ]
    )


def ddm_select(
    candidates: Sequence[np.ndarray] | np.ndarray, reference: np.ndarray, bins: int = 50
) -> int:
    """Distance-distribution matching (Roth et al. 2020, data sampling): the best of ``m`` candidates.

    Args:
        candidates: ``m`` candidate batches, each ``[b, d]``.
        reference: ``[n, d]`` embeddings whose distance distribution the batch
            should match (the dataset, or a large random pool of it).
        bins: histogram bins over the reference's distance range.

    Returns:
        Index of the candidate with the smallest Wasserstein distance between
        its normalised pairwise-distance histogram and the reference's.
    """
    return int(np.argmin(ddm_costs(candidates, distance_histogram(reference, bins))))


@dataclass(frozen=True)
class GaussianStats:
    """Mean, covariance trace and covariance square root of a set of embeddings.

    Attributes:
        mean: ``[d]``.
        trace: ``Tr(S)``.
        cov_sqrt: ``S^(1/2)`` (symmetric PSD, ``[d, d]``).
    """

    mean: np.ndarray
    trace: float
    cov_sqrt: np.ndarray


def gaussian_stats(embeddings: np.ndarray) -> GaussianStats:
    """:class:`GaussianStats` of ``embeddings`` ``[n, d]`` (sample covariance, ``ddof=1``, ``n >= 2``)."""
    x = check_embeddings(embeddings, "reference embeddings")
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 points, got {x.shape[0]}.")
    cov = np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])
    eigval, eigvec = np.linalg.eigh(cov)
    cov_sqrt = (eigvec * np.sqrt(np.clip(eigval, 0.0, None))) @ eigvec.T
    return GaussianStats(x.mean(axis=0), float(np.trace(cov)), cov_sqrt)


def frd_costs(
    candidates: Sequence[np.ndarray] | np.ndarray, reference: GaussianStats
) -> np.ndarray:
    """Frechet distance of each candidate batch's Gaussian to the reference Gaussian.

    ``||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))``. ``S1 S2`` has
    the eigenvalues of ``S1^(1/2) S2 S1^(1/2) = Y^T Y``, ``Y = Xc S1^(1/2) / sqrt(b - 1)``
    (``Xc`` the centred batch), so ``Tr((S1 S2)^(1/2))`` is the sum of the
    singular values of ``Y`` (its nuclear norm): one ``[b, d]`` SVD per
    candidate, exact also when the batch covariance is singular (``b <= d``),
    and no ``[d, d]`` square root per candidate.

    Args:
        candidates: ``m`` candidate batches of one size ``[b, d]`` (``b >= 2``).
        reference: :func:`gaussian_stats` of the reference (the pool).

    Returns:
        ``float64 [m]`` distances.
    """
    batches = np.stack(_check_candidates(candidates, same_size=True))
    means = batches.mean(axis=1)
    centred = (batches - means[:, None, :]) / np.sqrt(batches.shape[1] - 1)
    y = centred @ reference.cov_sqrt
    trace_sqrt = np.linalg.svd(y, compute_uv=False).sum(axis=1)
    trace_batch = np.sum(centred * centred, axis=(1, 2))
    mean_gap = np.sum((means - reference.mean) ** 2, axis=1)
    return mean_gap + reference.trace + trace_batch - 2.0 * trace_sqrt


def frd_select(candidates: Sequence[np.ndarray] | np.ndarray, reference: np.ndarray) -> int:
    """FRD-score matching (Roth et al. 2020, data sampling): the candidate closest in Frechet distance.

    Args:
        candidates: ``m`` candidate batches, each ``[b, d]``.
        reference: ``[n, d]`` embeddings (the dataset, or a large random pool of it).

    Returns:
        Index of the candidate minimising :func:`frd_costs`.
    """
    return int(np.argmin(frd_costs(candidates, gaussian_stats(reference))))


def _check_candidates(
    candidates: Sequence[np.ndarray] | np.ndarray, same_size: bool = False
) -> list[np.ndarray]:
    batches = [check_embeddings(c, "candidate embeddings") for c in candidates]
    if not batches:
        raise ValueError("there are no candidate batches to choose from.")
    shapes = {b.shape for b in batches}
    sizes = {shape[0] for shape in shapes}
    if len({shape[1] for shape in shapes}) > 1 or min(sizes) < 2 or (same_size and len(sizes) > 1):
        rule = "one batch size, " if same_size else ""
        raise ValueError(
            f"candidate batches need >= 2 rows each, {rule}and one embedding size, "
            f"got shapes {sorted(shapes)}."
        )
    return batches


# ----------------------------------------------------------------------------- store


class EmbeddingStore:
    """Thread-safe holder of the pool embeddings the embedded samplers read.

    :meth:`update` validates a complete ``[num_examples, d]`` array and swaps it
    in under a lock; :meth:`snapshot` returns the current (read-only) array and
    its version. Readers keep whatever snapshot they took while a new one is
    being computed, so sampling never waits for a refresh.

    Args:
        num_examples: rows expected (the sampler's examples, in label order).
    """

    def __init__(self, num_examples: int) -> None:
        if num_examples < 1:
            raise ValueError(f"EmbeddingStore needs num_examples >= 1, got {num_examples}.")
        self.num_examples = int(num_examples)
        self._lock = threading.Lock()
        self._embeddings: np.ndarray | None = None
        self._version = 0

    @property
    def version(self) -> int:
        """Number of updates so far (0: empty)."""
        with self._lock:
            return self._version

    def update(self, embeddings: np.ndarray) -> int:
        """Stores a new pool snapshot.

        Args:
            embeddings: ``[num_examples, d]``, all finite.

        Returns:
            The new version number.

        Raises:
            ValueError: for the wrong number of rows or non-finite values (the
                previous snapshot is kept).
        """
        x = np.asarray(embeddings)
        if x.ndim != 2 or x.shape[0] != self.num_examples:
            raise ValueError(
                f"the pool embeddings must be [{self.num_examples}, d] (one row per example "
                f"of the sampler, in order), got shape {x.shape}."
            )
        x = check_embeddings(x, "pool embeddings").astype(np.float32)
        x.setflags(write=False)
        with self._lock:
            self._embeddings = x
            self._version += 1
            return self._version

    def snapshot(self) -> tuple[int, np.ndarray]:
        """``(version, embeddings)`` of the last update.

        Raises:
            RuntimeError: when nothing was stored yet.
        """
        with self._lock:
            if self._embeddings is None:
                raise RuntimeError(
                    "the EmbeddingStore is empty: an embedded sampler needs the pool embeddings "
                    "before its first batch; pass a PoolEmbeddingRefresh callback to fit() "
                    "(it embeds the pool at train begin) or call store.update(embeddings)."
                )
            return self._version, self._embeddings


# ----------------------------------------------------------------------------- samplers

_CONTROLLER: list[ThreadpoolController] = []


def _blas_threads() -> ThreadpoolController:
    """The process's thread-pool controller, made once (making one scans the loaded libraries: 3 ms)."""
    if not _CONTROLLER:
        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0]


def _check_at_least_one(value: int, name: str) -> int:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    return int(value)


class SamplerOptions(TypedDict, total=False):
    """The keyword arguments every embedded sampler takes (see :class:`_EmbeddedSampler`)."""

    samples_per_class: int
    seed: int
    steps_per_epoch: int | None


class _EmbeddedSampler:
    """Shared part of the embedded samplers: groups, store snapshots, timing.

    Every sampler takes ``(labels, batch_size, store, <its own options>, **options)``
    with the keyword ``options`` of :class:`SamplerOptions` (the last three arguments below).

    Args:
        labels: integer label of each example (the store's rows, in order).
        batch_size: examples per batch, a multiple of ``samples_per_class``.
        store: the pool embeddings (:class:`EmbeddingStore` of ``len(labels)``).
        samples_per_class: ``m``, examples per class group in a batch.
        seed: base seed; batch ``(e, s)`` uses ``default_rng([seed, e, s])``.
        steps_per_epoch: batches per epoch; default ``len(labels) // batch_size``.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        store: EmbeddingStore,
        samples_per_class: int = 1,
        seed: int = 0,
        steps_per_epoch: int | None = None,
    ) -> None:
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.num_examples = int(self.labels.size)
        if store.num_examples != self.num_examples:
            raise ValueError(
                f"the store holds {store.num_examples} rows but there are {self.num_examples} labels."
            )
        self.groups = class_groups(batch_size, samples_per_class, min_batch_size=2)
        if batch_size > self.num_examples:
            raise ValueError(
                f"batch_size={batch_size} is larger than the {self.num_examples} examples."
            )
        self.batch_size = int(batch_size)
        self.samples_per_class = int(samples_per_class)
        self.store = store
        self.seed = int(seed)
        self.steps_per_epoch = check_steps(steps_per_epoch, self.num_examples // self.batch_size)
        _, self._class_of, self._members = class_members(self.labels)
        self._cache: tuple[int, Any] | None = None
        self._lock = threading.Lock()
        self.selection_seconds = 0.0
        self.batches_selected = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.steps_per_epoch

    def batch_indices(self, epoch: int, step: int) -> np.ndarray:
        """One batch from the last stored embeddings: ``int64 [batch_size]``.

        NumPy's BLAS runs single-threaded meanwhile (``threadpoolctl``, 0.02 ms; the limit
        is process-wide while it lasts): with the per-candidate matrices of a few
        dozen rows, multi-threaded OpenBLAS made FRD 7x slower on a busy
        2-core CPU (141 vs 21 ms per batch at 2 vs 1 threads, pool 2,720 x 128,
        batch 64, load average ~10).
        """
        start = time.perf_counter()
        version, pool = self.store.snapshot()
        rng = np.random.default_rng([self.seed, int(epoch), int(step)])
        with _blas_threads().limit(limits=1, user_api="blas"):  # small BLAS calls: threads only cost
            batch = self._select(pool, self._reference(version, pool), rng)
        with self._lock:
            self.selection_seconds += time.perf_counter() - start
            self.batches_selected += 1
        return batch.astype(np.int64)

    def epoch_indices(self, epoch: int = 0) -> np.ndarray:
        """All batches of one epoch from the current snapshot: ``int64 [len(self), batch_size]``."""
        return np.stack([self.batch_indices(epoch, s) for s in range(len(self))])

    def _reference(self, version: int, pool: np.ndarray) -> Any:
        with self._lock:
            if self._cache is not None and self._cache[0] == version:
                return self._cache[1]
        stats = self._pool_statistics(pool)
        with self._lock:
            self._cache = (version, stats)
        return stats

    def _pool_statistics(self, pool: np.ndarray) -> Any:
        """What a sampler precomputes once per store version (none by default)."""
        return None

    def _select(self, pool: np.ndarray, reference: Any, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def _group(self, anchor: int, rng: np.random.Generator) -> np.ndarray:
        """``anchor`` and ``m - 1`` other examples of its class (repeats only in classes smaller than m)."""
        others = self._members[self._class_of[anchor]]
        others = others[others != anchor]
        need = self.samples_per_class - 1
        if need == 0:
            return np.array([anchor])
        if others.size == 0:
            return np.full(need + 1, anchor)
        return np.append(anchor, rng.choice(others, size=need, replace=others.size < need))

    def _random_batch(self, rng: np.random.Generator) -> np.ndarray:
        """A random candidate: ``P`` distinct classes x ``m`` examples (``m = 1``: distinct examples)."""
        if self.samples_per_class == 1:
            return rng.choice(self.num_examples, size=self.batch_size, replace=False)
        classes = rng.choice(len(self._members), size=self.groups, replace=False)
        anchors = [rng.choice(self._members[c]) for c in classes]
        return np.concatenate([self._group(a, rng) for a in anchors])

    def _check_classes(self) -> None:
        if self.samples_per_class > 1:
            check_class_count(len(self._members), self.groups, self.samples_per_class, type(self).__name__)


class GreedyCoresetSampler(_EmbeddedSampler):
    """Greedy-coreset batches (Roth et al. 2020, data sampling, "GC").

    Each batch: a random pool of ``pool_size`` examples; :func:`greedy_coreset`
    picks ``P = batch_size / m`` of them (from a random first one); each pick
    brings ``m - 1`` random examples of its class.

    Args:
        labels: integer label of each example.
        batch_size: examples per batch.
        store: the pool embeddings.
        pool_size: random candidates per batch (the paper's code: 512), at
            least ``P``; clipped to the number of examples.
        **options: ``samples_per_class``, ``seed``, ``steps_per_epoch`` (:class:`_EmbeddedSampler`).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        store: EmbeddingStore,
        pool_size: int = 512,
        **options: Unpack[SamplerOptions],
    ) -> None:
        super().__init__(labels, batch_size, store, **options)
        self.pool_size = min(int(pool_size), self.num_examples)
        if self.pool_size < self.groups:
            raise ValueError(
                f"pool_size={pool_size} is smaller than the {self.groups} coreset points a batch needs."
            )

    def _select(self, pool: np.ndarray, reference: Any, rng: np.random.Generator) -> np.ndarray:
        subset = rng.choice(self.num_examples, size=self.pool_size, replace=False)
        picks = subset[greedy_coreset(pool[subset], self.groups, rng=rng)]
        return np.concatenate([self._group(a, rng) for a in picks])


class _MatchingSampler(_EmbeddedSampler):
    """Best of ``num_candidates`` random batches by a cost against the whole stored pool.

    Args:
        labels: integer label of each example.
        batch_size: examples per batch.
        store: the pool embeddings.
        num_candidates: random candidate batches per batch (the paper's code: 30).
        **options: ``samples_per_class``, ``seed``, ``steps_per_epoch`` (:class:`_EmbeddedSampler`).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        store: EmbeddingStore,
        num_candidates: int = 30,
        **options: Unpack[SamplerOptions],
    ) -> None:
        super().__init__(labels, batch_size, store, **options)
        self.num_candidates = _check_at_least_one(num_candidates, "num_candidates")
        self._check_classes()

    def _costs(self, candidates: list[np.ndarray], reference: Any) -> np.ndarray:
        raise NotImplementedError

    def _select(self, pool: np.ndarray, reference: Any, rng: np.random.Generator) -> np.ndarray:
        batches = [self._random_batch(rng) for _ in range(self.num_candidates)]
        costs = self._costs([pool[b] for b in batches], reference)
        return batches[int(np.argmin(costs))]


class DDMSampler(_MatchingSampler):
    """Distance-distribution matching batches (Roth et al. 2020, data sampling, "DDM").

    Each batch is the best of ``num_candidates`` random batches by
    :func:`ddm_costs` against the pairwise-distance histogram of the whole
    stored pool (computed once per store version: ``O(n^2 d)``).

    Args:
        labels, batch_size, store, num_candidates, **options: as :class:`_MatchingSampler`.
        bins: histogram bins (50).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        store: EmbeddingStore,
        num_candidates: int = 30,
        bins: int = 50,
        **options: Unpack[SamplerOptions],
    ) -> None:
        super().__init__(labels, batch_size, store, num_candidates, **options)
        self.bins = _check_at_least_one(bins, "bins")

    def _pool_statistics(self, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return distance_histogram(pool, self.bins)

    def _costs(self, candidates: list[np.ndarray], reference: Any) -> np.ndarray:
        return ddm_costs(candidates, reference)


class FRDSampler(_MatchingSampler):
    """FRD-score matching batches (Roth et al. 2020, data sampling, "FRD").

    Each batch is the best of ``num_candidates`` random batches by
    :func:`frd_costs` against the Gaussian of the whole stored pool (its
    covariance square root computed once per store version).

    Args:
        labels, batch_size, store, num_candidates, **options: as :class:`_MatchingSampler`.
    """

    def _pool_statistics(self, pool: np.ndarray) -> GaussianStats:
        return gaussian_stats(pool)

    def _costs(self, candidates: list[np.ndarray], reference: Any) -> np.ndarray:
        return frd_costs(candidates, reference)


# ----------------------------------------------------------------------------- refresh


class PoolEmbeddingRefresh(keras.callbacks.Callback):
    """Embeds the sampler's pool into an :class:`EmbeddingStore` during ``fit``.

    The pool is embedded once at train begin (synchronously: the first batch
    needs it), then every ``every_n_steps`` training steps and/or at the end of
    every ``every_n_epochs``-th epoch. With ``background=True`` a refresh runs
    in a worker thread while training goes on (a refresh still running when the
    next is due is skipped and counted in ``skipped``); otherwise it runs
    between two training steps. Either way the input pipeline keeps sampling
    from the previous snapshot until the new one is stored.

    Cost: ``durations`` lists the seconds of every refresh; at each epoch end
    ``logs["pool_refresh_s"]`` gets the seconds spent in refreshes that
    finished during the epoch.

    Args:
        store: the store the sampler reads.
        pool: the pool's model inputs, row ``i`` the example of label ``i`` of
            the sampler: an array ``[num_examples, ...]`` (e.g. eval-transformed
            images), or, for pools too large for memory, a ``tf.data.Dataset``
            of batches ``x`` or ``(x, y)`` in that order (e.g.
            :func:`~detreg_keras.data.pipeline.make_eval_dataset` of the
            training records; its length is checked at each refresh).
        every_n_steps: refresh period in training steps (``None``: never mid-epoch).
        every_n_epochs: refresh period in epochs (``None``: never at epoch end).
        batch_size: inference batch size (array pools).
        embed_fn: ``inputs [b, ...] -> embeddings [b, d]``; default the
            model's inference output (``model.predict_on_batch``).
        background: refresh in a worker thread.
    """

    def __init__(
        self,
        store: EmbeddingStore,
        pool: np.ndarray | tf.data.Dataset,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
        batch_size: int = 256,
        embed_fn: Callable[[np.ndarray], np.ndarray] | None = None,
        background: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or >= 1, got {value}.")
        if not isinstance(pool, tf.data.Dataset) and len(pool) != store.num_examples:
            raise ValueError(
                f"the pool has {len(pool)} inputs but the store expects {store.num_examples}."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.store = store
        self.pool = pool
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.batch_size = int(batch_size)
        self.embed_fn = embed_fn
        self.background = bool(background)
        self.durations: list[float] = []
        self.skipped = 0
        self._steps = 0
        self._epoch_seconds = 0.0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def embed_pool(self) -> np.ndarray:
        """The pool's embeddings, ``batch_size`` inputs at a time (or the dataset's batches)."""
        embed = self.embed_fn or self.model.predict_on_batch
        if isinstance(self.pool, tf.data.Dataset):
            batches = (b[0] if isinstance(b, tuple) else b for b in self.pool)
        else:
            batches = (
                self.pool[i : i + self.batch_size] for i in range(0, len(self.pool), self.batch_size)
            )
        return np.concatenate([np.asarray(embed(b)) for b in batches])

    def refresh(self) -> None:
        """Embeds the pool and stores it, timing the whole refresh."""
        start = time.perf_counter()
        self.store.update(self.embed_pool())
        seconds = time.perf_counter() - start
        with self._lock:
            self.durations.append(seconds)
            self._epoch_seconds += seconds

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._steps = 0
        self.refresh()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._raise_worker_error()
        self._steps += 1
        if self.every_n_steps and self._steps % self.every_n_steps == 0:
            self._trigger()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            self._trigger()
        with self._lock:
            seconds, self._epoch_seconds = self._epoch_seconds, 0.0
        if logs is not None:
            logs["pool_refresh_s"] = seconds

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._thread is not None:
            self._thread.join()
        self._raise_worker_error()

    def _trigger(self) -> None:
        if not self.background:
            self.refresh()
            return
        if self._thread is not None and self._thread.is_alive():
            self.skipped += 1
            return
        self._thread = threading.Thread(target=self._run_worker, name="pool-refresh", daemon=True)
        self._thread.start()

    def _run_worker(self) -> None:
        try:
            self.refresh()
        except BaseException as error:
            self._error = error

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"the background pool refresh failed: {error}") from error
