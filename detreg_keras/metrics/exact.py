"""Exact blocked ranking: each query's first same-class rank without kNN lists (numpy only).

Recall@k needs no kNN lists: a query is a hit iff the rank of its nearest
same-class item is below k. :func:`first_positive_ranks` computes these ranks
with one blocked float32 GEMM and one counting pass, with memory bounded by
``max_block_bytes`` and a cost independent of ``max(ks)`` (SOP's Recall@1000
costs what Recall@1 does). It gives the faiss path's results except for the
order of exactly tied similarities, which it breaks by gallery index.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np

from detreg_keras.metrics._checks import (
    ArrayLike,
    EvalInputs,
    check_positive_int,
    prepare_inputs,
)

__all__ = ["DEFAULT_MAX_BLOCK_BYTES", "MISS", "TIE_RULES", "first_positive_ranks", "positive_ranks"]

#: Default bound on the float32 similarity block of :func:`first_positive_ranks`
#: (256 MiB: 1109 query rows against the 60,502 images of SOP's test split).
DEFAULT_MAX_BLOCK_BYTES = 256 * 2**20
#: Rank given to queries without any same-class gallery item (never a hit).
MISS = np.iinfo(np.int64).max
#: Tie rules of :func:`first_positive_ranks`.
TIE_RULES = ("index", "optimistic", "pessimistic")
TieRule = Literal["index", "optimistic", "pessimistic"]


def _resolve_block_rows(
    num_queries: int, num_gallery: int, block_size: int | None, max_block_bytes: int
) -> int:
    """Query rows per similarity block: ``block_size`` capped by ``max_block_bytes``."""
    check_positive_int(max_block_bytes, "max_block_bytes")
    check_positive_int(block_size, "block_size", allow_none=True)
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
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {list(TIE_RULES)}, got {ties!r}.")
    num_threads = _default_threads() if num_threads is None else check_positive_int(num_threads, "num_threads")
    nq, ng = query.shape[0], gallery.shape[0]
    rows = _resolve_block_rows(nq, ng, block_size, max_block_bytes)
    num_codes = int(max(query_codes.max(initial=-1), gallery_codes.max(initial=-1))) + 1
    members, starts = _class_members(gallery_codes, num_codes)
    ranks = np.full(nq, MISS, dtype=np.int64)
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
    :func:`~detreg_keras.metrics.search.knn_search`). A query is a Recall@k hit iff its rank is ``< k``.

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
    inputs = prepare_inputs(embeddings, labels, query_embeddings, query_labels, normalize)
    return positive_ranks(inputs, ties=ties, block_size=block_size, max_block_bytes=max_block_bytes, num_threads=num_threads)


def positive_ranks(
    inputs: EvalInputs,
    *,
    ties: TieRule = "index",
    block_size: int | None = None,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    num_threads: int | None = None,
) -> np.ndarray:
    """:func:`first_positive_ranks` of already prepared inputs (see :func:`~._checks.prepare_inputs`)."""
    return _positive_ranks(
        inputs.query,
        inputs.gallery,
        inputs.query_labels,
        inputs.gallery_labels,
        inputs.same_source,
        ties=ties,
        block_size=block_size,
        max_block_bytes=max_block_bytes,
        num_threads=num_threads,
    )



