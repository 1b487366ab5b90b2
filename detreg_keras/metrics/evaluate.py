"""Embedding-level evaluation: :func:`evaluate_embeddings` and its one-metric shortcuts.

Two evaluation modes:

* **all-vs-all** (CUB-200-2011, Cars-196, SOP): pass ``embeddings, labels`` only.
  Every item is a query and the gallery is the whole set minus the query itself
  (excluded by index, so exact duplicates of the query still count as
  neighbours).
* **query/gallery** (In-shop): pass ``query_embeddings, query_labels`` as well;
  ``embeddings, labels`` are then the gallery and nothing is excluded.

Embeddings are L2-normalised (cosine similarity) unless ``normalize=False``, in
which case the raw inner product is used.

:func:`evaluate_embeddings` computes every kNN metric from **one** search with
``k = max(max(ks), min(max R, max_r))`` (compare ``AccuracyCalculator(k=
"max_bin_count")``). ``max_r`` (default 1000) caps R so that a huge class does
not blow up the search: for a query with ``R > max_r`` R-Precision and MAP@R
are computed on the first ``max_r`` neighbours with ``R := max_r``, as
``AccuracyCalculator`` does when ``k`` is smaller than the largest class.
``max_r=None`` removes the cap (exact MAP@R whatever the class sizes).

The search and the clustering are passed in, as in ``AccuracyCalculator``:
``knn_func`` (default :class:`~detreg_keras.metrics.search.FaissKNN`) and
``kmeans_func`` (default :func:`~detreg_keras.metrics.clustering.kmeans_cluster`).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from detreg_keras.metrics import retrieval_metrics as rm
from detreg_keras.metrics._checks import (
    ArrayLike,
    EvalInputs,
    UseGpu,
    prepare_inputs,
    validate_ks,
)
from detreg_keras.metrics.clustering import calculate_nmi, kmeans_cluster
from detreg_keras.metrics.exact import DEFAULT_MAX_BLOCK_BYTES, TieRule, positive_ranks
from detreg_keras.metrics.search import DEFAULT_CHUNK_SIZE, FaissKNN

__all__ = [
    "DEFAULT_MAX_R",
    "KMeansFunc",
    "KnnFunc",
    "evaluate_embeddings",
    "map_at_r",
    "precision_at_1",
    "r_precision",
    "recall_at_k",
    "recall_at_k_exact",
]

#: Default cap on R for R-Precision and MAP@R (see the module docstring).
DEFAULT_MAX_R = 1000
RecallMethod = Literal["knn", "exact", "auto"]
#: ``knn_func(queries, gallery, k) -> (indices [Nq, k], similarities [Nq, k])``,
#: best first; ``gallery=None`` means all-vs-all with each query excluded by index.
KnnFunc = Callable[[np.ndarray, "np.ndarray | None", int], "tuple[np.ndarray, np.ndarray]"]
#: ``kmeans_func(vectors [N, D], num_clusters) -> cluster ids [N]``.
KMeansFunc = Callable[[np.ndarray, int], np.ndarray]
_KNN_METRICS = ("map@r", "r_precision", "precision@1")


def _r_depth(r: np.ndarray, max_r: int | None) -> int:
    """The search depth R-Precision and MAP@R need: ``min(max R, max_r)``, at least 1."""
    if max_r is not None and (isinstance(max_r, bool) or int(max_r) < 1):
        raise ValueError(f"max_r must be a positive integer or None, got {max_r!r}.")
    depth = int(r.max()) if r.size else 0
    if max_r is not None:
        depth = min(depth, int(max_r))
    return max(depth, 1)


def _search_depth(inputs: EvalInputs, want: set[str], ks: tuple[int, ...], knn_recall: bool, max_r: int | None) -> int:
    """Depth of the one kNN search the requested metrics need (0: no search)."""
    depth = max(ks) if knn_recall else 0
    if want & {"map@r", "r_precision"}:
        depth = max(depth, _r_depth(inputs.r, max_r))
    if "precision@1" in want:
        depth = max(depth, 1)
    return depth


def _knn_results(
    inputs: EvalInputs, want: set[str], ks: tuple[int, ...], knn_recall: bool, max_r: int | None, knn_labels: np.ndarray
) -> dict[str, float]:
    """The metrics computed from the neighbours' labels."""
    out: dict[str, float] = {}
    if knn_recall:
        out.update(rm.calculate_recall_at_k(knn_labels, inputs.query_labels, ks))
    r = inputs.r if max_r is None else np.minimum(inputs.r, int(max_r))
    with warnings.catch_warnings():
        if len(want & set(_KNN_METRICS)) > 1:
            warnings.simplefilter("once", RuntimeWarning)
        if "map@r" in want:
            out["map@r"] = rm.calculate_mean_average_precision_at_r(knn_labels, inputs.query_labels, r)
        if "r_precision" in want:
            out["r_precision"] = rm.calculate_r_precision(knn_labels, inputs.query_labels, r)
        if "precision@1" in want:
            out["precision@1"] = rm.calculate_precision_at_1(knn_labels, inputs.query_labels, inputs.r)
    return out


def _uses_exact_recall(want: set[str], recall_method: str) -> bool:
    if recall_method not in ("knn", "exact", "auto"):
        raise ValueError(f"recall_method must be 'knn', 'exact' or 'auto', got {recall_method!r}.")
    only_recall = not want & set(_KNN_METRICS)
    return "recall" in want and (recall_method == "exact" or (recall_method == "auto" and only_recall))


def evaluate_embeddings(
    embeddings: ArrayLike,
    labels: ArrayLike,
    ks: int | Sequence[int] = (1, 2, 4, 8),
    *,
    query_embeddings: ArrayLike | None = None,
    query_labels: ArrayLike | None = None,
    metrics: str | Sequence[str] = rm.METRIC_NAMES,
    normalize: bool = True,
    max_r: int | None = DEFAULT_MAX_R,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    use_gpu: UseGpu = "auto",
    nmi_seed: int = 0,
    nmi_niter: int = 20,
    recall_method: RecallMethod = "knn",
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    knn_func: KnnFunc | None = None,
    kmeans_func: KMeansFunc | None = None,
) -> dict[str, float]:
    """Computes the retrieval (and clustering) metrics from one kNN search.

    The search depth is ``max(max(ks), min(max R, max_r))`` over the requested
    metrics, i.e. AccuracyCalculator's ``k="max_bin_count"`` with a cap.
    With ``recall_method="exact"`` Recall@k comes from
    :func:`~detreg_keras.metrics.exact.first_positive_ranks` instead and
    ``max(ks)`` no longer enters the search depth (no kNN search at all when
    only ``"recall"`` is requested).

    Args:
        embeddings: [N, D] embeddings; the gallery in query/gallery mode.
        labels: [N] class ids (any sortable dtype; shape [N, 1] is accepted).
        ks: k values for Recall@k.
        query_embeddings: [Nq, D] queries for query/gallery mode (In-shop); in
            that mode nothing is excluded from a query's neighbours.
        query_labels: [Nq] query class ids.
        metrics: any of :data:`METRIC_NAMES` (``"recall"``, ``"map@r"``,
            ``"r_precision"``, ``"precision@1"``, ``"nmi"``); each is its result
            key, ``"recall"`` gives ``"recall@<k>"`` for each k. The old
            spellings ``"map_at_r"`` and ``"precision_at_1"`` are accepted for
            one release and give ``"map@r"`` and ``"precision@1"``.
        normalize: L2-normalise (cosine similarity) first.
        max_r: cap on R for MAP@R and R-Precision (``None``: no cap).
        chunk_size: queries per faiss call of the default ``knn_func``.
        use_gpu: GPU use of the default ``knn_func`` and ``kmeans_func``
            (``"auto"``, ``True``, ``False``).
        nmi_seed: seed of the default ``kmeans_func`` (NMI is computed on the queries).
        nmi_niter: k-means iterations of the default ``kmeans_func``.
        recall_method: how Recall@k is computed. ``"knn"`` (default): from the
            kNN lists. ``"exact"``: from first-positive ranks (one GEMM and one
            pass, memory bounded by ``max_block_bytes``, cost independent of
            ``max(ks)``; ties broken by gallery index, which differs from faiss
            only for queries whose best same-class similarity is exactly tied
            with another class's). ``"auto"``: ``"exact"`` when Recall@k is the
            only kNN-based metric requested, else ``"knn"``.
        max_block_bytes: similarity-block bound for the exact Recall@k path.
        knn_func: the search backend, ``knn_func(queries, gallery, k)`` (see
            :data:`KnnFunc`); default ``FaissKNN(use_gpu, chunk_size)``.
        kmeans_func: the clustering backend, ``kmeans_func(vectors, k)``;
            default :func:`kmeans_cluster` with ``nmi_seed``, ``nmi_niter``, ``use_gpu``.

    Returns:
        ``{key: value}`` for the requested metrics, in the order requested
        (:func:`metric_keys`), values are Python floats in [0, 1].

    Raises:
        ValueError: on bad inputs, unknown metric names or ``max(ks)`` larger
            than the gallery.
    """
    names = rm.resolve_metric_names(metrics)
    want = set(names)
    exact_recall = _uses_exact_recall(want, recall_method)
    ks = validate_ks(ks) if "recall" in want else ()
    inputs = prepare_inputs(embeddings, labels, query_embeddings, query_labels, normalize)
    out: dict[str, float] = {}
    if exact_recall:
        inputs.check_depth(max(ks))
        out.update(rm.recall_from_ranks(positive_ranks(inputs, max_block_bytes=max_block_bytes), ks))
    knn_recall = "recall" in want and not exact_recall
    depth = _search_depth(inputs, want, ks, knn_recall, max_r)
    if depth:
        inputs.check_depth(depth)
        search = knn_func or FaissKNN(use_gpu=use_gpu, chunk_size=chunk_size)
        idx, _ = search(inputs.query, None if inputs.same_source else inputs.gallery, depth)
        out.update(_knn_results(inputs, want, ks, knn_recall, max_r, inputs.gallery_labels[idx]))
    if "nmi" in want:
        cluster = kmeans_func or functools.partial(kmeans_cluster, seed=nmi_seed, niter=nmi_niter, use_gpu=use_gpu)
        out["nmi"] = calculate_nmi(inputs.query_labels, cluster(inputs.query, len(np.unique(inputs.query_labels))))
    for key, value in out.items():
        if math.isnan(value):  # pragma: no cover - defensive
            raise RuntimeError(f"metric {key} is NaN")
    return {key: out[key] for key in rm.metric_keys(ks, names)}  # in the order requested


def _refuse_metrics(function: str, options: dict) -> None:
    if "metrics" in options:
        raise TypeError(f"{function} computes one metric; pass metrics= to evaluate_embeddings instead.")


def _one_metric(name: str, embeddings: ArrayLike, labels: ArrayLike, options: dict) -> float:
    _refuse_metrics(name, options)
    return evaluate_embeddings(embeddings, labels, metrics=(name,), **options)[name]


def recall_at_k(
    embeddings: ArrayLike, labels: ArrayLike, ks: int | Sequence[int] = (1, 2, 4, 8), **options
) -> dict[str, float]:
    """Recall@k for each k: ``evaluate_embeddings(..., metrics=("recall",))``.

    Args:
        embeddings: [N, D] embeddings (the gallery in query/gallery mode).
        labels: [N] class ids.
        ks: the k values, e.g. ``(1, 2, 4, 8)`` (CUB/Cars), ``(1, 10, 100, 1000)``
            (SOP) or ``(1, 10, 20, 30, 40, 50)`` (In-shop).
        **options: the keyword options of :func:`evaluate_embeddings`
            (``query_embeddings``, ``query_labels``, ``normalize``, ``chunk_size``,
            ``use_gpu``, ``recall_method``, ``knn_func`` ...).

    Returns:
        ``{"recall@1": ..., "recall@2": ..., ...}``, values in [0, 1].
    """
    _refuse_metrics("recall_at_k", options)
    return evaluate_embeddings(embeddings, labels, ks, metrics=("recall",), **options)


def _single_metric(key: str, name: str, summary: str) -> Callable[..., float]:
    """The shortcut ``name(embeddings, labels, **options)`` of :func:`evaluate_embeddings`'s metric ``key``."""

    def metric(embeddings: ArrayLike, labels: ArrayLike, **options) -> float:
        return _one_metric(key, embeddings, labels, options)

    metric.__name__ = metric.__qualname__ = name
    metric.__doc__ = f"""{summary}

    Args:
        embeddings: [N, D] embeddings (the gallery in query/gallery mode).
        labels: [N] class ids.
        **options: the keyword options of :func:`evaluate_embeddings`.

    Returns:
        {key} in [0, 1].
    """
    return metric


precision_at_1 = _single_metric(
    "precision@1", "precision_at_1", "Precision@1 over the queries that have a same-class gallery item."
)
r_precision = _single_metric(
    "r_precision", "r_precision", "R-Precision (Musgrave et al. 2020), R capped at ``max_r`` (an option, default 1000)."
)
map_at_r = _single_metric(
    "map@r", "map_at_r", "MAP@R (Musgrave et al. 2020), R capped at ``max_r`` (an option, default 1000)."
)


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
    computed from :func:`~detreg_keras.metrics.exact.first_positive_ranks`:
    Recall@k is the fraction of queries whose first same-class item has rank
    ``< k``. The cost is one ``2 * Nq * Ng * D`` FLOP GEMM plus one linear pass
    over the similarities, whatever ``max(ks)``; the memory is bounded by
    ``max_block_bytes``. Identical to the faiss path except for the order of
    exactly tied similarities.

    Args:
        embeddings: [N, D] embeddings (the gallery in query/gallery mode).
        labels: [N] class ids.
        ks: the k values; ``max(ks)`` may not exceed the gallery size available per query.
        query_embeddings: [Nq, D] queries for query/gallery mode (In-shop).
        query_labels: [Nq] query class ids.
        normalize: L2-normalise (cosine similarity); ``False`` uses raw inner products.
        ties: tie rule, see :func:`~detreg_keras.metrics.exact.first_positive_ranks`.
        block_size: query rows per block (``None``: from ``max_block_bytes``).
        max_block_bytes: bound on the float32 similarity block.
        num_threads: threads for the counting pass (default: half the usable CPUs, at least one).

    Returns:
        ``{"recall@k": value}`` for each k, values in [0, 1].

    Raises:
        ValueError: on bad inputs or ``max(ks)`` larger than the gallery.
    """
    ks = validate_ks(ks)
    inputs = prepare_inputs(embeddings, labels, query_embeddings, query_labels, normalize)
    inputs.check_depth(max(ks))
    ranks = positive_ranks(
        inputs, ties=ties, block_size=block_size, max_block_bytes=max_block_bytes, num_threads=num_threads
    )
    return rm.recall_from_ranks(ranks, ks)
