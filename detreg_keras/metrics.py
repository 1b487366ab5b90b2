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

Recall@k needs no kNN lists: a query is a hit iff the rank of its nearest
same-class item is below k. :func:`recall_at_k_exact` (and
``evaluate_embeddings(..., recall_method="exact")``) computes these ranks with
one blocked float32 GEMM and one counting pass, with memory bounded by
``max_block_bytes`` and a cost independent of ``max(ks)`` (SOP's Recall@1000
costs what Recall@1 does). It gives the faiss path's results except for the
order of exactly tied similarities, which it breaks by gallery index (see
:func:`first_positive_ranks`).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Union

import numpy as np

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_BLOCK_BYTES",
    "DEFAULT_MAX_R",
    "METRIC_NAMES",
    "knn_search",
    "recall_at_k",
    "recall_at_k_exact",
    "first_positive_ranks",
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
#: Default bound on the float32 similarity block of :func:`recall_at_k_exact`
#: (256 MiB: 1109 query rows against the 60,502 images of SOP's test split).
DEFAULT_MAX_BLOCK_BYTES = 256 * 2**20
#: Rank given to queries without any same-class gallery item (never a hit).
_MISS = np.iinfo(np.int64).max
_TIE_RULES = ("index", "optimistic", "pessimistic")

ArrayLike = Any
UseGpu = Union[bool, Literal["auto"]]
TieRule = Literal["index", "optimistic", "pessimistic"]
RecallMethod = Literal["knn", "exact", "auto"]

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
# Exact Recall@k from first-positive ranks (no kNN lists)
# --------------------------------------------------------------------------- #
def _resolve_block_rows(
    num_queries: int, num_gallery: int, block_size: int | None, max_block_bytes: int
) -> int:
    """Query rows per similarity block: ``block_size`` capped by ``max_block_bytes``."""
    if isinstance(max_block_bytes, bool) or not isinstance(max_block_bytes, (int, np.integer)) or max_block_bytes < 1:
        raise ValueError(f"max_block_bytes must be a positive integer, got {max_block_bytes!r}.")
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1
    ):
        raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}.")
    rows = max(1, int(max_block_bytes) // (4 * num_gallery))
    if block_size is not None:
        rows = min(rows, int(block_size))
    return min(rows, num_queries)


def _class_members(gallery_labels: np.ndarray, num_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """Gallery indices grouped by class (ascending within a class) and class offsets."""
    order = np.argsort(gallery_labels, kind="stable").astype(np.int64)
    starts = np.searchsorted(gallery_labels[order], np.arange(num_codes + 1)).astype(np.int64)
    return order, starts


def _block_best_positives(
    sims: np.ndarray,
    q_codes: np.ndarray,
    self_cols: np.ndarray | None,
    members: np.ndarray,
    starts: np.ndarray,
    max_gather: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best same-class similarity per row of ``sims`` (taken from ``sims`` itself).

    Returns ``(best, first_col, num_at_best)``: the best positive similarity
    (``-inf`` for a query without positives), the smallest gallery index that
    attains it, and how many positives attain it.
    """
    rows = sims.shape[0]
    counts = starts[q_codes + 1] - starts[q_codes]
    best = np.full(rows, -np.inf, dtype=np.float32)
    first_col = np.zeros(rows, dtype=np.int64)
    num_at_best = np.zeros(rows, dtype=np.int64)
    ends = np.cumsum(counts)
    lo = 0
    while lo < rows:
        # Rows [lo, hi) gather at most max_gather similarities (at least one row).
        base = ends[lo - 1] if lo else 0
        hi = max(lo + 1, int(np.searchsorted(ends, base + max_gather, side="right")))
        hi = min(hi, rows)
        seg_counts = counts[lo:hi]
        total = int(seg_counts.sum())
        if total:
            row_rep = np.repeat(np.arange(lo, hi, dtype=np.int64), seg_counts)
            seg_start = np.cumsum(seg_counts) - seg_counts
            within = np.arange(total, dtype=np.int64) - np.repeat(seg_start, seg_counts)
            cols = members[np.repeat(starts[q_codes[lo:hi]], seg_counts) + within]
            vals = sims[row_rep, cols]
            if self_cols is not None:  # the query itself is not a positive (by index)
                vals[cols == self_cols[row_rep]] = -np.inf
            nonempty = seg_counts > 0
            local = np.flatnonzero(nonempty)
            offsets = seg_start[nonempty]
            seg_best = np.maximum.reduceat(vals, offsets)
            at_best = vals == np.repeat(seg_best, seg_counts[nonempty])
            big = np.iinfo(np.int64).max
            seg_first = np.minimum.reduceat(np.where(at_best, cols, big), offsets)
            seg_num = np.add.reduceat(at_best.astype(np.int64), offsets)
            has = seg_best > -np.inf
            idx = lo + local[has]
            best[idx] = seg_best[has]
            first_col[idx] = seg_first[has]
            num_at_best[idx] = seg_num[has]
        lo = hi
    return best, first_col, num_at_best


def _count_ranks(
    sims: np.ndarray,
    row_lo: int,
    row_hi: int,
    best: np.ndarray,
    first_col: np.ndarray,
    num_at_best: np.ndarray,
    ties: str,
    out: np.ndarray,
) -> None:
    """Writes the first-positive rank of rows ``[row_lo, row_hi)`` of ``sims`` into ``out``.

    One pass over each row, in row-sized pieces that stay in cache; the numpy
    calls release the GIL, so several threads can share a block.
    """
    scratch = np.empty(sims.shape[1], dtype=bool)
    count, gt, ge = np.count_nonzero, np.greater, np.greater_equal
    for r in range(row_lo, row_hi):
        p = best[r]
        if p == -np.inf:
            continue  # no positive: out keeps its "miss" sentinel
        row = sims[r]
        if ties == "index":
            j = int(first_col[r])
            out[r] = count(ge(row[:j], p, out=scratch[:j])) + count(gt(row[j + 1:], p, out=scratch[j + 1:]))
        elif ties == "optimistic":
            out[r] = count(gt(row, p, out=scratch))
        else:  # pessimistic
            out[r] = count(ge(row, p, out=scratch)) - num_at_best[r]


def _default_threads() -> int:
    """Half the usable CPUs: the counting pass is memory-bound, and the BLAS
    threads keep busy-waiting for a while after each GEMM (on 2 cores, a second
    counting thread only competes with them)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // 2)


def _positive_ranks(
    query: np.ndarray,
    gallery: np.ndarray,
    query_codes: np.ndarray,
    gallery_codes: np.ndarray,
    same_source: bool,
    *,
    ties: str,
    block_size: int | None,
    max_block_bytes: int,
    num_threads: int | None,
) -> np.ndarray:
    """Core of :func:`first_positive_ranks` on prepared (validated, coded) inputs."""
    if ties not in _TIE_RULES:
        raise ValueError(f"ties must be one of {list(_TIE_RULES)}, got {ties!r}.")
    if num_threads is None:
        num_threads = _default_threads()
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}.")
    nq, ng = query.shape[0], gallery.shape[0]
    rows = _resolve_block_rows(nq, ng, block_size, max_block_bytes)
    num_codes = int(max(query_codes.max(initial=-1), gallery_codes.max(initial=-1))) + 1
    members, starts = _class_members(gallery_codes, num_codes)
    ranks = np.full(nq, _MISS, dtype=np.int64)
    buf = np.empty((rows, ng), dtype=np.float32)
    gallery_t = gallery.T  # a transposed view: sgemm reads it in place
    # Same-class pairs gathered per step: about max_block_bytes of temporaries.
    max_gather = max(rows, int(max_block_bytes) // 64)
    pool = ThreadPoolExecutor(int(num_threads)) if num_threads > 1 else None
    try:
        for start in range(0, nq, rows):
            stop = min(start + rows, nq)
            b = stop - start
            sims = buf[:b]
            np.matmul(query[start:stop], gallery_t, out=sims)
            self_cols = np.arange(start, stop, dtype=np.int64) if same_source else None
            best, first_col, num_at_best = _block_best_positives(
                sims, query_codes[start:stop], self_cols, members, starts, max_gather
            )
            if same_source:  # exclude the query itself, by index
                sims[np.arange(b), self_cols] = -np.inf
            out = ranks[start:stop]
            if pool is None or b < 2 * num_threads:
                _count_ranks(sims, 0, b, best, first_col, num_at_best, ties, out)
            else:
                edges = np.linspace(0, b, int(num_threads) + 1).astype(int)
                jobs = [
                    pool.submit(_count_ranks, sims, int(lo), int(hi), best, first_col, num_at_best, ties, out)
                    for lo, hi in itertools.pairwise(edges)
                ]
                for job in jobs:
                    job.result()
    finally:
        if pool is not None:
            pool.shutdown()
    return ranks


def _recall_from_ranks(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    return {f"recall@{k}": float(np.mean(ranks < k)) for k in ks}


def first_positive_ranks(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    query_embeddings: ArrayLike | None = None,
    query_labels: ArrayLike | None = None,
    normalize: bool = True,
    ties: TieRule = "index",
    block_size: int | None = None,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    num_threads: int | None = None,
) -> np.ndarray:
    """Exact rank of each query's nearest same-class gallery item.

    The rank of a query is the 0-based position of its first same-class item
    in its gallery sorted by decreasing similarity, i.e. the number of gallery
    items ranked before it. In all-vs-all mode the query itself is removed from
    its gallery *by index* (an exact duplicate of the query still counts, as in
    :func:`knn_search`). A query is a Recall@k hit iff its rank is ``< k``.

    No kNN lists are built: the query rows are processed in blocks whose
    similarities come from one float32 GEMM (``numpy.matmul``, i.e. the BLAS
    ``sgemm`` on all cores); the best positive similarity ``p`` of each query
    is read from that same block (so it is bit-identical to the value it is
    compared with), and the rank is the number of other items whose
    similarity beats ``p`` under the tie rule:

    * ``"index"`` (default): ties are broken by gallery index, lower first.
      The rank is exactly the position of the first positive after a *stable*
      sort by decreasing similarity (``np.argsort(-s, kind="stable")``), so the
      result does not depend on the block size or the search depth.
    * ``"optimistic"``: positives come first among exactly tied items
      (``#{s > p}``): an upper bound on Recall@k over all tie orders.
    * ``"pessimistic"``: positives come last among exactly tied items
      (``#{s >= p} - #{positives with s == p}``): a lower bound.

    The three coincide unless a different-class item has a similarity
    *exactly* (bitwise, in float32) equal to a query's best positive.

    Difference from the faiss path (:func:`recall_at_k`,
    :func:`evaluate_embeddings` with ``recall_method="knn"``): given the same
    float32 similarities, the per-query hits are identical except for queries
    whose best positive is exactly tied with a different-class item. There
    faiss (1.15, CPU ``IndexFlatIP``; observed, not documented by faiss) keeps
    the *lowest* indices of a tie that straddles the search depth but lists
    the items of a tie in *decreasing* index order, so its hit lies between
    the ``"pessimistic"`` and ``"optimistic"`` ones and can depend on the
    search depth (``max(ks)``, or R for MAP@R), while ``"index"`` is the
    stable-sort order. faiss also computes the similarities with its own BLAS
    build and blocking, so a near tie (within float32 rounding, ~1e-7) can
    resolve differently too.

    Memory: besides the inputs (and their normalised copies), one float32
    buffer of ``rows * N_gallery`` similarities, where ``rows =
    min(block_size, max_block_bytes // (4 * N_gallery))`` (at least one
    row), one bool row per thread, and the block's same-class pairs, gathered
    ``max(rows, max_block_bytes // 64)`` pairs at a time (about 50 bytes each,
    so at most about ``max_block_bytes`` more; a single query's class is never
    split). Never ``N x N``.

    Args:
        embeddings: [N, D] embeddings (the gallery in query/gallery mode).
        labels: [N] class ids (any sortable dtype; shape [N, 1] is accepted).
        query_embeddings: [Nq, D] queries for query/gallery mode (In-shop);
            nothing is excluded from their gallery.
        query_labels: [Nq] query class ids.
        normalize: L2-normalise (cosine similarity); ``False`` uses raw inner
            products.
        ties: ``"index"``, ``"optimistic"`` or ``"pessimistic"`` (see above).
        block_size: query rows per block; ``None`` takes the most that fit in
            ``max_block_bytes``. ``max_block_bytes`` caps it either way.
        max_block_bytes: bound on the similarity block (default 256 MiB).
        num_threads: threads for the counting pass (default: half the CPUs
            this process may use, at least one). The GEMM uses the BLAS
            library's own threads (all cores by default).

    Returns:
        int64 [Nq] ranks in ``[0, available)``; queries without any same-class
        gallery item (lone queries) get ``np.iinfo(np.int64).max``.

    Raises:
        ValueError: on bad inputs (as :func:`evaluate_embeddings`), an unknown
            ``ties`` or a non-positive ``block_size``, ``max_block_bytes`` or
            ``num_threads``.
    """
    p = _Prepared(embeddings, labels, query_embeddings, query_labels, normalize)
    return p.positive_ranks(ties, block_size, max_block_bytes, num_threads)


def recall_at_k_exact(
    embeddings: ArrayLike,
    labels: ArrayLike,
    ks: int | Sequence[int] = (1, 2, 4, 8),
    *,
    query_embeddings: ArrayLike | None = None,
    query_labels: ArrayLike | None = None,
    normalize: bool = True,
    ties: TieRule = "index",
    block_size: int | None = None,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    num_threads: int | None = None,
) -> dict[str, float]:
    """Exact Recall@k for all ``ks`` at once, without kNN lists.

    Same definition as :func:`recall_at_k` (every query counts, lone queries
    are misses, the query itself is excluded by index in all-vs-all mode),
    computed from :func:`first_positive_ranks`: Recall@k is the fraction of
    queries whose first same-class item has rank ``< k``. The cost is one
    ``2 * Nq * Ng * D`` FLOP GEMM plus one linear pass over the similarities,
    whatever ``max(ks)``; the memory is bounded by ``max_block_bytes``.
    Identical to the faiss path except for the order of exactly tied
    similarities (see :func:`first_positive_ranks`).

    Args:
        embeddings: [N, D] embeddings (the gallery in query/gallery mode).
        labels: [N] class ids.
        ks: the k values, e.g. ``(1, 10, 100, 1000)`` (SOP); ``max(ks)`` may
            not exceed the gallery size available per query (as in
            :func:`recall_at_k`).
        query_embeddings: [Nq, D] queries for query/gallery mode (In-shop).
        query_labels: [Nq] query class ids.
        normalize: L2-normalise (cosine similarity); ``False`` uses raw inner
            products.
        ties: tie rule, see :func:`first_positive_ranks`.
        block_size: query rows per block (``None``: from ``max_block_bytes``).
        max_block_bytes: bound on the float32 similarity block.
        num_threads: threads for the counting pass (default: half the
            usable CPUs, at least one).

    Returns:
        ``{"recall@k": value}`` for each k, values in [0, 1].

    Raises:
        ValueError: on bad inputs or ``max(ks)`` larger than the gallery.
    """
    ks = _validate_ks(ks)
    p = _Prepared(embeddings, labels, query_embeddings, query_labels, normalize)
    p.check_depth(max(ks))
    return _recall_from_ranks(p.positive_ranks(ties, block_size, max_block_bytes, num_threads), ks)


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

    def check_depth(self, k: int) -> None:
        if k > self.available:
            raise ValueError(
                f"a kNN depth of {k} was requested but each query only has "
                f"{self.available} gallery items"
                + (" (the query itself is excluded)" if self.same_source else "")
                + "; lower ks."
            )

    def positive_ranks(
        self, ties: str, block_size: int | None, max_block_bytes: int, num_threads: int | None
    ) -> np.ndarray:
        return _positive_ranks(
            self.query,
            self.gallery,
            self.query_labels,
            self.gallery_labels,
            self.same_source,
            ties=ties,
            block_size=block_size,
            max_block_bytes=max_block_bytes,
            num_threads=num_threads,
        )

    def knn_labels(self, k: int, chunk_size: int, use_gpu: UseGpu) -> np.ndarray:
        self.check_depth(k)
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
    recall_method: RecallMethod = "knn",
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
) -> dict[str, float]:
    """Computes the retrieval (and clustering) metrics from one kNN search.

    The search depth is ``max(max(ks), min(max R, max_r))`` over the requested
    metrics, i.e. AccuracyCalculator's ``k="max_bin_count"`` with a cap.
    With ``recall_method="exact"`` Recall@k comes from
    :func:`recall_at_k_exact` instead and ``max(ks)`` no longer enters the
    search depth (no kNN search at all when only ``"recall"`` is requested).

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
        recall_method: how Recall@k is computed. ``"knn"`` (default): from the
            faiss kNN lists, as before. ``"exact"``: :func:`recall_at_k_exact`
            (one GEMM and one pass, memory bounded by ``max_block_bytes``, cost
            independent of ``max(ks)``; ties broken by gallery index, which
            differs from faiss only for queries whose best same-class
            similarity is exactly tied with another class's, see
            :func:`first_positive_ranks`). ``"auto"``: ``"exact"`` when Recall@k
            is the only kNN-based metric requested (it then replaces the kNN
            search; with MAP@R, R-Precision or Precision@1 the search runs
            anyway and also yields Recall@k), else ``"knn"``; so ``"auto"``
            can differ from ``"knn"`` in the same exact-tie cases.
        max_block_bytes: similarity-block bound for the exact Recall@k path.

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
    if recall_method not in ("knn", "exact", "auto"):
        raise ValueError(f"recall_method must be 'knn', 'exact' or 'auto', got {recall_method!r}.")
    ks = _validate_ks(ks) if "recall" in want else ()
    p = _Prepared(embeddings, labels, query_embeddings, query_labels, normalize)
    knn_metrics = want & {"map_at_r", "r_precision", "precision_at_1"}
    exact_recall = "recall" in want and (
        recall_method == "exact" or (recall_method == "auto" and not knn_metrics)
    )

    out: dict[str, float] = {}
    if exact_recall:
        p.check_depth(max(ks))
        ranks = p.positive_ranks("index", None, max_block_bytes, None)
        out.update(_recall_from_ranks(ranks, ks))

    depth = 0
    if "recall" in want and not exact_recall:
        depth = max(depth, max(ks))
    if want & {"map_at_r", "r_precision"}:
        depth = max(depth, _r_depth(p.r, max_r))
    if "precision_at_1" in want:
        depth = max(depth, 1)

    if depth:
        knn = p.knn_labels(depth, chunk_size, use_gpu)
        r = p.r if max_r is None else np.minimum(p.r, int(max_r))
        if "recall" in want and not exact_recall:
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
