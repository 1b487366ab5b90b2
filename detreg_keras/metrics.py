"""Retrieval and clustering metrics for deep metric learning (numpy + faiss).

Everything here works on plain arrays: no Keras, no TensorFlow. The metric
definitions follow pytorch-metric-learning's ``AccuracyCalculator``
(``src/pytorch_metric_learning/utils/accuracy_calculator.py``), which in turn
implements Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020):

* **Recall@k** (the number reported by the DReg and Proxy Anchor papers): the
  fraction of *all* queries with at least one same-class item among their k
  nearest gallery items. ``AccuracyCalculator`` has no Recall@k; this follows
  the papers' evaluation code, where a query without any same-class gallery item
  simply counts as a miss.
* **Precision@1**, **R-Precision** and **MAP@R**: exactly as
  ``AccuracyCalculator``. For a query, ``R`` is the number of gallery items with
  its label (minus the query itself in all-vs-all mode). Queries with ``R == 0``
  ("lone" queries, e.g. singleton classes) are left out of the mean, and a
  metric whose every query is lone is ``0.0``. So Precision@1 and Recall@1
  differ exactly when lone queries exist.
* **NMI**: k-means on the query embeddings with k = number of distinct query
  labels, then ``sklearn.metrics.normalized_mutual_info_score``. Like
  ``AccuracyCalculator`` the clustering runs with faiss (20 iterations); unlike
  it, the centroids are seeded with k-means++ from a fixed seed, which makes the
  score reproducible and much less sensitive to a bad random start.

Two evaluation modes:

* **all-vs-all** (CUB-200-2011, Cars-196, SOP): pass ``embeddings, labels`` only.
  Every item is a query and the gallery is the whole set minus the query itself
  (excluded by index, so exact duplicates of the query still count as
  neighbours).
* **query/gallery** (In-shop): pass ``query_embeddings, query_labels`` as well;
  ``embeddings, labels`` are then the gallery and nothing is excluded.

Embeddings are L2-normalised (cosine similarity) unless ``normalize=False``, in
which case the raw inner product is used.

:func:`evaluate_embeddings` computes every metric from **one** kNN search with
``k = max(max(ks), min(max R, max_r))`` (compare ``AccuracyCalculator(k=
"max_bin_count")``). ``max_r`` (default 1000) caps R so that a huge class does
not blow up the search: for a query with ``R > max_r`` R-Precision and MAP@R
are computed on the first ``max_r`` neighbours with ``R := max_r``, as
``AccuracyCalculator`` does when ``k`` is smaller than the largest class.
``max_r=None`` removes the cap (exact MAP@R whatever the class sizes).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal, Union

import numpy as np

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_R",
    "METRIC_NAMES",
    "knn_search",
    "recall_at_k",
    "precision_at_1",
    "r_precision",
    "map_at_r",
    "nmi",
    "evaluate_embeddings",
    "calculate_recall_at_k",
    "calculate_precision_at_1",
    "calculate_r_precision",
    "calculate_mean_average_precision_at_r",
    "calculate_nmi",
    "kmeans_cluster",
    "l2_normalize",
    "same_class_counts",
]

logger = logging.getLogger(__name__)

#: Queries searched per faiss call. Each call holds ``chunk_size * (k + 1)``
#: similarities (float32) and ids (int64), i.e. ``chunk_size * (k + 1) * 12``
#: bytes: 4096 queries with k = 1000 is about 49 MB.
DEFAULT_CHUNK_SIZE = 4096
#: Default cap on R for R-Precision and MAP@R (see the module docstring).
DEFAULT_MAX_R = 1000
#: Metric groups accepted by :func:`evaluate_embeddings`.
METRIC_NAMES = ("recall", "map_at_r", "r_precision", "precision_at_1", "nmi")
#: Largest k the faiss GPU brute-force search supports; larger k runs on CPU.
_GPU_MAX_K = 2048

ArrayLike = Any
UseGpu = Union[bool, Literal["auto"]]

_GPU_RESOURCES: Any = None


# --------------------------------------------------------------------------- #
# Input handling
# --------------------------------------------------------------------------- #
def _as_matrix(x: ArrayLike, name: str) -> np.ndarray:
    """Returns ``x`` as a C-contiguous float32 [N, D] array, or raises."""
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name} could not be converted to an array: {exc}") from exc
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape [num_items, dim], got shape {arr.shape}."
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {arr.shape}.")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}.")
    if np.iscomplexobj(arr):
        raise ValueError(f"{name} must be real-valued, got dtype {arr.dtype}.")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    bad_rows = ~np.isfinite(arr).all(axis=1)
    if bad_rows.any():
        first = int(np.flatnonzero(bad_rows)[0])
        raise ValueError(
            f"{name} contains NaN or Inf values in {int(bad_rows.sum())} row(s) "
            f"(first at row {first}); embeddings must be finite (a diverged model?)."
        )
    return arr


def _as_labels(y: ArrayLike, name: str, num_items: int) -> np.ndarray:
    """Returns labels as a 1-D array of length ``num_items``, or raises."""
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D array of class ids (or shape [N, 1]), got shape "
            f"{arr.shape}. One-hot labels must be converted with argmax first."
        )
    if arr.shape[0] != num_items:
        raise ValueError(
            f"{name} has {arr.shape[0]} entries but there are {num_items} embeddings; "
            "they must match one to one."
        )
    return arr


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Scales each row of ``x`` to unit L2 norm (all-zero rows stay zero).

    Args:
        x: float array of shape [N, D].
        eps: floor on the norm, to avoid dividing by zero.

    Returns:
        A new C-contiguous float32 array of the same shape.
    """
    x = np.asarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    return np.ascontiguousarray(x / np.maximum(norms, eps)[:, None].astype(np.float32))


def _validate_ks(ks: int | Iterable[int]) -> tuple[int, ...]:
    if isinstance(ks, (int, np.integer)):
        ks = (int(ks),)
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must contain at least one k, got an empty sequence.")
    out = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"every k in ks must be an integer, got {k!r} in {ks!r}.")
        if k < 1:
            raise ValueError(f"every k in ks must be >= 1, got {k} in {ks!r}.")
        out.append(int(k))
    return tuple(out)


# --------------------------------------------------------------------------- #
# kNN search
# --------------------------------------------------------------------------- #
def _gpu_available() -> bool:
    try:
        import faiss  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _build_index(gallery: np.ndarray, k_search: int, use_gpu: UseGpu) -> Any:
    import faiss  # noqa: PLC0415

    global _GPU_RESOURCES
    index = faiss.IndexFlatIP(gallery.shape[1])
    if use_gpu not in ("auto", True, False):
        raise ValueError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}.")
    want_gpu = _gpu_available() if use_gpu == "auto" else bool(use_gpu)
    if want_gpu and not _gpu_available():
        raise ValueError(
            "use_gpu=True but faiss has no GPU support here (install faiss-gpu and "
            "check faiss.get_num_gpus() > 0), or pass use_gpu='auto'."
        )
    if want_gpu and k_search > _GPU_MAX_K:
        logger.info("k=%d exceeds the faiss GPU limit (%d); searching on CPU.", k_search, _GPU_MAX_K)
        want_gpu = False
    if want_gpu:
        if _GPU_RESOURCES is None:
            _GPU_RESOURCES = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)
    index.add(gallery)
    return index


def knn_search(
    queries: ArrayLike,
    gallery: ArrayLike | None = None,
    k: int | None = None,
    *,
    exclude_self: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    use_gpu: UseGpu = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact maximum-inner-product kNN search with faiss ``IndexFlatIP``.

    The vectors are used as given (normalise them first for cosine similarity).
    With ``gallery=None`` the search is all-vs-all: the queries are also the
    gallery and, when ``exclude_self`` is true, each query's own index is removed
    from its result *by id*: the search asks for ``k + 1`` neighbours and drops
    the query's own id if present, otherwise the last (k+1-th) neighbour. This
    stays correct when exact duplicates tie with the query itself.

    Memory: the queries are searched ``chunk_size`` rows at a time, so besides the
    gallery index (``N_gallery * D * 4`` bytes, on the GPU when used) and the
    returned arrays (``N_queries * k * 12`` bytes), a call holds at most
    ``chunk_size * (k + 1) * 12`` bytes of intermediate results plus faiss's
    fixed-size internal distance tiles.

    Args:
        queries: [Nq, D] query vectors.
        gallery: [Ng, D] gallery vectors, or ``None`` for all-vs-all.
        k: number of neighbours per query (required), ``1 <= k <= Ng`` (``<= Nq - 1`` in
            all-vs-all mode with ``exclude_self``).
        exclude_self: in all-vs-all mode, drop each query from its own result.
            Ignored when a separate ``gallery`` is given.
        chunk_size: number of queries per faiss search call (>= 1).
        use_gpu: ``"auto"`` uses GPU faiss when it is installed and
            ``faiss.get_num_gpus() > 0``; ``True`` requires it; ``False`` forces
            CPU. GPU search is limited to k <= 2048 and falls back to CPU above.

    Returns:
        ``(indices, similarities)``: int64 [Nq, k] gallery indices and float32
        [Nq, k] inner products, sorted by decreasing similarity per row.

    Raises:
        ValueError: on non-2-D, empty, non-finite or dimension-mismatched inputs,
            on ``k`` outside ``[1, available gallery size]``, or on a bad
            ``chunk_size``.
    """
    q = _as_matrix(queries, "queries")
    all_vs_all = gallery is None
    g = q if all_vs_all else _as_matrix(gallery, "gallery")
    if g.shape[1] != q.shape[1]:
        raise ValueError(
            f"gallery has dimension {g.shape[1]} but queries have dimension {q.shape[1]}; "
            "both must come from the same embedding space."
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer number of neighbours, got {k!r}.")
    k = int(k)
    drop_self = all_vs_all and exclude_self
    available = g.shape[0] - (1 if drop_self else 0)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if k > available:
        detail = (
            f"{g.shape[0]} items minus the query itself" if drop_self else f"{g.shape[0]} items"
        )
        raise ValueError(
            f"k={k} exceeds the number of gallery items available per query "
            f"({available}: {detail})."
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")

    k_search = k + 1 if drop_self else k
    index = _build_index(g, k_search, use_gpu)
    n = q.shape[0]
    indices = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, int(chunk_size)):
        stop = min(start + int(chunk_size), n)
        d_chunk, i_chunk = index.search(q[start:stop], k_search)
        if drop_self:
            self_ids = np.arange(start, stop, dtype=np.int64)[:, None]
            keep = i_chunk != self_ids
            # Rows whose own id is not among the k+1 results (more than k exact
            # ties with the query itself) drop their last neighbour instead.
            no_self = keep.all(axis=1)
            keep[no_self, -1] = False
            i_chunk = i_chunk[keep].reshape(stop - start, k)
            d_chunk = d_chunk[keep].reshape(stop - start, k)
        indices[start:stop] = i_chunk
        sims[start:stop] = d_chunk
    if (indices < 0).any():  # pragma: no cover - faiss pads with -1 only if k > Ng
        raise RuntimeError("faiss returned fewer neighbours than requested.")
    return indices, sims


# --------------------------------------------------------------------------- #
# Metrics from kNN labels (the AccuracyCalculator "calculate_*" layer)
# --------------------------------------------------------------------------- #
def calculate_recall_at_k(
    knn_labels: np.ndarray, query_labels: np.ndarray, ks: Sequence[int]
) -> dict[str, float]:
    """Recall@k: fraction of queries with a same-class item among the first k.

    Every query counts (lone queries are misses), as in the DML papers.

    Args:
        knn_labels: [Nq, K] labels of each query's neighbours, nearest first,
            with ``K >= max(ks)``.
        query_labels: [Nq] labels of the queries.
        ks: the k values.

    Returns:
        ``{"recall@k": value}`` for each k.
    """
    knn_labels = np.asarray(knn_labels)
    query_labels = np.asarray(query_labels)
    ks = _validate_ks(ks)
    if max(ks) > knn_labels.shape[1]:
        raise ValueError(f"need at least {max(ks)} neighbours per query, got {knn_labels.shape[1]}.")
    match = knn_labels == query_labels[:, None]
    first_hit = np.where(match.any(axis=1), match.argmax(axis=1), np.iinfo(np.int64).max)
    return {f"recall@{k}": float(np.mean(first_hit < k)) for k in ks}


def _not_lone(r: np.ndarray) -> np.ndarray:
    mask = np.asarray(r) > 0
    if not mask.any():
        warnings.warn(
            "No query has a same-class item in the gallery; precision@1, R-precision "
            "and MAP@R are reported as 0.",
            RuntimeWarning,
            stacklevel=3,
        )
    return mask


def calculate_precision_at_1(
    knn_labels: np.ndarray, query_labels: np.ndarray, r: np.ndarray
) -> float:
    """Precision@1 over the queries with ``r > 0`` (AccuracyCalculator).

    Args:
        knn_labels: [Nq, K>=1] neighbour labels, nearest first.
        query_labels: [Nq] query labels.
        r: [Nq] number of same-class gallery items per query (excluding the
            query itself); queries with ``r == 0`` are left out.

    Returns:
        The mean over non-lone queries, or 0.0 if all queries are lone.
    """
    knn_labels = np.asarray(knn_labels)
    query_labels = np.asarray(query_labels)
    mask = _not_lone(r)
    if not mask.any():
        return 0.0
    return float(np.mean(knn_labels[mask, 0] == query_labels[mask]))


def _relevance(
    knn_labels: np.ndarray, query_labels: np.ndarray, r: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Matches restricted to the first R neighbours of each non-lone query."""
    knn_labels = np.asarray(knn_labels)
    query_labels = np.asarray(query_labels)
    r = np.asarray(r, dtype=np.int64)
    mask = _not_lone(r)
    if not mask.any():
        return None
    knn_labels, query_labels, r = knn_labels[mask], query_labels[mask], r[mask]
    # R beyond the searched depth is truncated, like AccuracyCalculator's mask.
    r = np.minimum(r, knn_labels.shape[1])
    relevant = np.arange(knn_labels.shape[1])[None, :] < r[:, None]
    match = (knn_labels == query_labels[:, None]) & relevant
    return match, relevant, r


def calculate_r_precision(
    knn_labels: np.ndarray, query_labels: np.ndarray, r: np.ndarray
) -> float:
    """R-Precision: same-class fraction of the first R neighbours, mean over queries.

    Args:
        knn_labels: [Nq, K] neighbour labels, nearest first. If ``K < r`` for a
            query, R is truncated to K for it (as in AccuracyCalculator).
        query_labels: [Nq] query labels.
        r: [Nq] number of same-class gallery items per query; queries with
            ``r == 0`` are left out.

    Returns:
        The mean over non-lone queries, or 0.0 if all queries are lone.
    """
    rel = _relevance(knn_labels, query_labels, r)
    if rel is None:
        return 0.0
    match, _, r_eff = rel
    return float(np.mean(match.sum(axis=1) / r_eff))


def calculate_mean_average_precision_at_r(
    knn_labels: np.ndarray, query_labels: np.ndarray, r: np.ndarray
) -> float:
    """MAP@R (Musgrave et al. 2020).

    For a query with R same-class gallery items,
    ``AP@R = (1/R) * sum_{i=1..R} P(i) * rel(i)``, where ``rel(i)`` says whether
    the i-th neighbour has the query's class and ``P(i)`` is the precision of the
    first i neighbours.

    Args:
        knn_labels: [Nq, K] neighbour labels, nearest first (R truncated to K).
        query_labels: [Nq] query labels.
        r: [Nq] number of same-class gallery items per query; queries with
            ``r == 0`` are left out.

    Returns:
        The mean over non-lone queries, or 0.0 if all queries are lone.
    """
    rel = _relevance(knn_labels, query_labels, r)
    if rel is None:
        return 0.0
    match, _, r_eff = rel
    ranks = np.arange(1, match.shape[1] + 1, dtype=np.float64)[None, :]
    precision_at_i = np.cumsum(match, axis=1) / ranks
    return float(np.mean((precision_at_i * match).sum(axis=1) / r_eff))


def calculate_nmi(query_labels: np.ndarray, cluster_labels: np.ndarray) -> float:
    """``sklearn.metrics.normalized_mutual_info_score(query_labels, cluster_labels)``."""
    from sklearn.metrics import normalized_mutual_info_score  # noqa: PLC0415

    return float(normalized_mutual_info_score(np.asarray(query_labels), np.asarray(cluster_labels)))


# --------------------------------------------------------------------------- #
# Clustering
# --------------------------------------------------------------------------- #
def _kmeans_pp_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007), O(N * k * D)."""
    n = x.shape[0]
    sq_norms = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    chosen = [int(rng.integers(n))]
    d2 = np.maximum(sq_norms - 2.0 * (x @ x[chosen[0]]) + sq_norms[chosen[0]], 0.0)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0.0:  # fewer distinct points than clusters
            idx = int(rng.integers(n))
        else:
            idx = int(rng.choice(n, p=d2 / total))
        chosen.append(idx)
        d2 = np.minimum(d2, np.maximum(sq_norms - 2.0 * (x @ x[idx]) + sq_norms[idx], 0.0))
    return np.ascontiguousarray(x[chosen], dtype=np.float32)


def kmeans_cluster(
    x: ArrayLike,
    num_clusters: int,
    *,
    seed: int = 0,
    niter: int = 20,
    init: Literal["k-means++", "random"] = "k-means++",
    use_gpu: UseGpu = "auto",
) -> np.ndarray:
    """Clusters the rows of ``x`` with faiss k-means and returns cluster ids.

    Args:
        x: [N, D] vectors.
        num_clusters: number of clusters, ``1 <= num_clusters <= N``.
        seed: random seed (initialisation and faiss sampling).
        niter: Lloyd iterations (20, as AccuracyCalculator).
        init: ``"k-means++"`` seeding (computed in numpy, O(N * k * D)) or
            faiss's ``"random"`` sampling of initial centroids.
        use_gpu: as in :func:`knn_search`.

    Returns:
        int64 [N] cluster assignment.
    """
    import faiss  # noqa: PLC0415

    x = _as_matrix(x, "x")
    n, d = x.shape
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be in [1, {n}], got {num_clusters}.")
    if init not in ("k-means++", "random"):
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}.")
    gpu = _gpu_available() if use_gpu == "auto" else bool(use_gpu)
    km = faiss.Kmeans(
        d,
        int(num_clusters),
        niter=int(niter),
        seed=int(seed),
        verbose=False,
        gpu=gpu,
        min_points_per_centroid=1,
    )
    init_centroids = None
    if init == "k-means++":
        init_centroids = _kmeans_pp_init(x, int(num_clusters), np.random.default_rng(seed))
    km.train(x, init_centroids=init_centroids)
    _, assign = km.index.search(x, 1)
    return assign[:, 0].astype(np.int64)


# --------------------------------------------------------------------------- #
# Embedding-level API
# --------------------------------------------------------------------------- #
def same_class_counts(
    query_labels: np.ndarray, gallery_labels: np.ndarray, *, same_source: bool
) -> np.ndarray:
    """Number of gallery items sharing each query's label (R per query).

    Args:
        query_labels: [Nq] labels.
        gallery_labels: [Ng] labels.
        same_source: all-vs-all mode; the query itself is subtracted.

    Returns:
        int64 [Nq].
    """
    uniq, counts = np.unique(gallery_labels, return_counts=True)
    pos = np.searchsorted(uniq, query_labels)
    pos_c = np.minimum(pos, len(uniq) - 1)
    found = uniq[pos_c] == query_labels
    r = np.where(found, counts[pos_c], 0).astype(np.int64)
    return r - 1 if same_source else r


class _Prepared:
    """Validated, normalised inputs shared by the metric functions."""

    def __init__(
        self,
        embeddings: ArrayLike,
        labels: ArrayLike,
        query_embeddings: ArrayLike | None,
        query_labels: ArrayLike | None,
        normalize: bool,
    ) -> None:
        if (query_embeddings is None) != (query_labels is None):
            raise ValueError(
                "query_embeddings and query_labels must be given together (query/gallery "
                "mode) or both left out (all-vs-all mode)."
            )
        gallery = _as_matrix(embeddings, "embeddings")
        g_labels = _as_labels(labels, "labels", gallery.shape[0])
        self.same_source = query_embeddings is None
        if self.same_source:
            query, q_labels = gallery, g_labels
        else:
            query = _as_matrix(query_embeddings, "query_embeddings")
            q_labels = _as_labels(query_labels, "query_labels", query.shape[0])
            if query.shape[1] != gallery.shape[1]:
                raise ValueError(
                    f"query_embeddings have dimension {query.shape[1]} but embeddings "
                    f"(the gallery) have dimension {gallery.shape[1]}."
                )
        # Map labels of any dtype to shared integer codes.
        try:
            _, codes = np.unique(np.concatenate([q_labels, g_labels]), return_inverse=True)
        except TypeError as exc:
            raise ValueError(f"labels must be mutually comparable class ids: {exc}") from exc
        codes = codes.reshape(-1).astype(np.int64)
        self.query_labels = codes[: len(q_labels)]
        self.gallery_labels = codes[len(q_labels):]
        if normalize:
            gallery = l2_normalize(gallery)
            query = gallery if self.same_source else l2_normalize(query)
        self.gallery = gallery
        self.query = query
        self.r = same_class_counts(self.query_labels, self.gallery_labels, same_source=self.same_source)
        self.available = gallery.shape[0] - (1 if self.same_source else 0)

    def knn_labels(self, k: int, chunk_size: int, use_gpu: UseGpu) -> np.ndarray:
        if k > self.available:
            raise ValueError(
                f"a kNN depth of {k} was requested but each query only has "
                f"{self.available} gallery items"
                + (" (the query itself is excluded)" if self.same_source else "")
                + "; lower ks."
            )
        idx, _ = knn_search(
            self.query,
            None if self.same_source else self.gallery,
            k,
            exclude_self=True,
            chunk_size=chunk_size,
            use_gpu=use_gpu,
        )
        return self.gallery_labels[idx]


def _r_depth(r: np.ndarray, max_r: int | None) -> int:
    if max_r is not None and (isinstance(max_r, bool) or int(max_r) < 1):
        raise ValueError(f"max_r must be a positive integer or None, got {max_r!r}.")
    depth = int(r.max()) if r.size else 0
    if max_r is not None:
        depth = min(depth, int(max_r))
    return max(depth, 1)


def recall_at_k(
    embeddings: ArrayLike,
    labels: ArrayLike,
    ks: int | Sequence[int] = (1, 2, 4, 8),
    *,
    query_embeddings: ArrayLike | None = None,
    query_labels: ArrayLike | None = None,
    normalize: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    use_gpu: UseGpu = "auto",
) -> dict[str, float]:
    """Recall@k for each k (see the module docstring for the definition).

    Args:
        embeddings: [N, D] embeddings (the gallery in query/gallery mode).
        labels: [N] class ids.
        ks: the k values, e.g. ``(1, 2, 4, 8)`` (CUB/Cars), ``(1, 10, 100, 1000)``
            (SOP) or ``(1, 10, 20, 30, 40, 50)`` (In-shop).
        query_embeddings: [Nq, D] queries for query/gallery mode (In-shop).
        query_labels: [Nq] query class ids.
        normalize: L2-normalise (cosine similarity); ``False`` uses raw inner
            products.
        chunk_size: queries per faiss call (see :func:`knn_search`).
        use_gpu: see :func:`knn_search`.

    Returns:
        ``{"recall@1": ..., "recall@2": ..., ...}``, values in [0, 1].
    """
    ks = _validate_ks(ks)
    p = _Prepared(embeddings, labels, query_embeddings, query_labels, normalize)
    knn = p.knn_labels(max(ks), chunk_size, use_gpu)
    return calculate_recall_at_k(knn, p.query_labels, ks)


def precision_at_1(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    query_embeddings: ArrayLike | None = None,
    query_labels: ArrayLike | None = None,
    normalize: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    use_gpu: UseGpu = "auto",
) -> float:
    """Precision@1 over queries that have a same-class gallery item.

    Args:
        embeddings: [N, D] embeddings (the gallery in query/gallery mode).
        labels: [N] class ids.
        query_embeddings: [Nq, D] queries for query/gallery mode (In-shop).
        query_labels: [Nq] query class ids.
        normalize: L2-normalise (cosine similarity); ``False`` uses raw inner
            products.
        chunk_size: queries per faiss call (see :func:`knn_search`).
        use_gpu: see :func:`knn_search`.

    Returns:
        Precision@1 in [0, 1].
    """
    p = _Prepared(embeddings, labels, query_embeddings, query_labels, normalize)
    knn = p.knn_labels(1, chunk_size, use_gpu)
    return calculate_precision_at_1(knn, p.query_labels, p.r)


def r_precision(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    query_embeddings: ArrayLike | None = None,
    query_labels: ArrayLike | None = None,
    normalize: bool = True,
    max_r: int | None = DEFAULT_MAX_R,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    use_gpu: UseGpu = "auto",
) -> float:
    """R-Precision (Musgrave et al. 2020), R capped at ``max_r``.

    Args:
        embeddings: [N, D] embeddings (the gallery in query/gallery mode).
        labels: [N] class ids.
        query_embeddings: [Nq, D] queries for query/gallery mode (In-shop).
        query_labels: [Nq] query class ids.
        normalize: L2-normalise (cosine similarity); ``False`` uses raw inner
            products.
        max_r: cap on R (``None``: no cap); see the module docstring.
        chunk_size: queries per faiss call (see :func:`knn_search`).
        use_gpu: see :func:`knn_search`.

    Returns:
        R-Precision in [0, 1].
    """
    p = _Prepared(embeddings, labels, query_embeddings, query_labels, normalize)
    knn = p.knn_labels(_r_depth(p.r, max_r), chunk_size, use_gpu)
    return calculate_r_precision(knn, p.query_labels, p.r)


def map_at_r(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    query_embeddings: ArrayLike | None = None,
    query_labels: ArrayLike | None = None,
    normalize: bool = True,
    max_r: int | None = DEFAULT_MAX_R,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    use_gpu: UseGpu = "auto",
) -> float:
    """MAP@R (Musgrave et al. 2020), R capped at ``max_r``.

    Args:
        embeddings: [N, D] embeddings (the gallery in query/gallery mode).
        labels: [N] class ids.
        query_embeddings: [Nq, D] queries for query/gallery mode (In-shop).
        query_labels: [Nq] query class ids.
        normalize: L2-normalise (cosine similarity); ``False`` uses raw inner
            products.
        max_r: cap on R (``None``: no cap); see the module docstring.
        chunk_size: queries per faiss call (see :func:`knn_search`).
        use_gpu: see :func:`knn_search`.

    Returns:
        MAP@R in [0, 1].
    """
    p = _Prepared(embeddings, labels, query_embeddings, query_labels, normalize)
    knn = p.knn_labels(_r_depth(p.r, max_r), chunk_size, use_gpu)
    return calculate_mean_average_precision_at_r(knn, p.query_labels, p.r)


def nmi(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    normalize: bool = True,
    seed: int = 0,
    niter: int = 20,
    init: Literal["k-means++", "random"] = "k-means++",
    use_gpu: UseGpu = "auto",
) -> float:
    """NMI of k-means clusters (k = number of classes) against the labels.

    Args:
        embeddings: [N, D] embeddings (the queries, in query/gallery mode).
        labels: [N] class ids.
        normalize: L2-normalise before clustering.
        seed: k-means seed.
        niter: k-means iterations.
        init: centroid seeding, see :func:`kmeans_cluster`.
        use_gpu: see :func:`knn_search`.

    Returns:
        NMI in [0, 1].
    """
    x = _as_matrix(embeddings, "embeddings")
    y = _as_labels(labels, "labels", x.shape[0])
    if normalize:
        x = l2_normalize(x)
    num_clusters = len(np.unique(y))
    clusters = kmeans_cluster(x, num_clusters, seed=seed, niter=niter, init=init, use_gpu=use_gpu)
    return calculate_nmi(y, clusters)


def evaluate_embeddings(
    embeddings: ArrayLike,
    labels: ArrayLike,
    ks: int | Sequence[int] = (1, 2, 4, 8),
    *,
    query_embeddings: ArrayLike | None = None,
    query_labels: ArrayLike | None = None,
    metrics: Sequence[str] = METRIC_NAMES,
    normalize: bool = True,
    max_r: int | None = DEFAULT_MAX_R,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    use_gpu: UseGpu = "auto",
    nmi_seed: int = 0,
    nmi_niter: int = 20,
) -> dict[str, float]:
    """Computes the retrieval (and clustering) metrics from one kNN search.

    The search depth is ``max(max(ks), min(max R, max_r))`` over the requested
    metrics, i.e. AccuracyCalculator's ``k="max_bin_count"`` with a cap.

    Args:
        embeddings: [N, D] embeddings; the gallery in query/gallery mode.
        labels: [N] class ids (any sortable dtype; shape [N, 1] is accepted).
        ks: k values for Recall@k.
        query_embeddings: [Nq, D] queries for query/gallery mode (In-shop); in
            that mode nothing is excluded from a query's neighbours.
        query_labels: [Nq] query class ids.
        metrics: any of ``"recall"``, ``"map_at_r"``, ``"r_precision"``,
            ``"precision_at_1"``, ``"nmi"``.
        normalize: L2-normalise (cosine similarity) first.
        max_r: cap on R for MAP@R and R-Precision (``None``: no cap).
        chunk_size: queries per faiss call (memory bound, see
            :func:`knn_search`).
        use_gpu: see :func:`knn_search`.
        nmi_seed: k-means seed for NMI (computed on the queries).
        nmi_niter: k-means iterations for NMI.

    Returns:
        A dict with the keys ``"recall@<k>"`` (each k), ``"map@r"``,
        ``"r_precision"``, ``"precision@1"`` and ``"nmi"`` for the requested
        metrics, values are Python floats in [0, 1].

    Raises:
        ValueError: on bad inputs, unknown metric names or ``max(ks)`` larger
            than the gallery.
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}.")
    if not metrics:
        raise ValueError(f"metrics is empty; choose from {list(METRIC_NAMES)}.")
    want = set(metrics)
    ks = _validate_ks(ks) if "recall" in want else ()
    p = _Prepared(embeddings, labels, query_embeddings, query_labels, normalize)

    depth = 0
    if "recall" in want:
        depth = max(depth, max(ks))
    if want & {"map_at_r", "r_precision"}:
        depth = max(depth, _r_depth(p.r, max_r))
    if "precision_at_1" in want:
        depth = max(depth, 1)

    out: dict[str, float] = {}
    if depth:
        knn = p.knn_labels(depth, chunk_size, use_gpu)
        r = p.r if max_r is None else np.minimum(p.r, int(max_r))
        if "recall" in want:
            out.update(calculate_recall_at_k(knn, p.query_labels, ks))
        with warnings.catch_warnings():
            if len(want & {"map_at_r", "r_precision", "precision_at_1"}) > 1:
                warnings.simplefilter("once", RuntimeWarning)
            if "map_at_r" in want:
                out["map@r"] = calculate_mean_average_precision_at_r(knn, p.query_labels, r)
            if "r_precision" in want:
                out["r_precision"] = calculate_r_precision(knn, p.query_labels, r)
            if "precision_at_1" in want:
                out["precision@1"] = calculate_precision_at_1(knn, p.query_labels, p.r)
    if "nmi" in want:
        num_clusters = len(np.unique(p.query_labels))
        clusters = kmeans_cluster(
            p.query, num_clusters, seed=nmi_seed, niter=nmi_niter, use_gpu=use_gpu
        )
        out["nmi"] = calculate_nmi(p.query_labels, clusters)
    for key, value in out.items():
        if math.isnan(value):  # pragma: no cover - defensive
            raise RuntimeError(f"metric {key} is NaN")
    return out
