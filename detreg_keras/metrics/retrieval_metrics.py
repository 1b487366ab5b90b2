"""The retrieval metric definitions: one small function per metric, on kNN labels or ranks.

As pytorch-metric-learning's ``AccuracyCalculator``
(``src/pytorch_metric_learning/utils/accuracy_calculator.py``), each metric is
one ``calculate_*`` function of the neighbours' labels, so it can be checked on
a hand-made ranking, whatever search produced it (Musgrave et al., "A Metric
Learning Reality Check", ECCV 2020):

* **Recall@k** (the number reported by the DReg and Proxy Anchor papers): the
  fraction of *all* queries with at least one same-class item among their k
  nearest gallery items; a query without any same-class gallery item counts
  as a miss (the papers' evaluation code; ``AccuracyCalculator`` has none).
* **Precision@1**, **R-Precision** and **MAP@R**: exactly as
  ``AccuracyCalculator``. ``R`` is the number of gallery items with the
  query's label (minus the query itself in all-vs-all mode). Queries with
  ``R == 0`` ("lone" queries) are left out of the mean, and a metric whose
  every query is lone is ``0.0``; so Precision@1 and Recall@1 differ exactly
  when lone queries exist.

Result keys: ``"recall@<k>"``, ``"map@r"``, ``"r_precision"``,
``"precision@1"``, ``"nmi"``; the names a caller requests
(:data:`METRIC_NAMES`) are these keys, with ``"recall"`` standing for all the
``"recall@<k>"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from detreg_keras.metrics._checks import validate_ks

__all__ = [
    "METRIC_ALIASES",
    "METRIC_NAMES",
    "calculate_mean_average_precision_at_r",
    "calculate_precision_at_1",
    "calculate_r_precision",
    "calculate_recall_at_k",
    "metric_keys",
    "recall_from_ranks",
    "resolve_metric_names",
]

#: Metrics :func:`~detreg_keras.metrics.evaluate_embeddings` computes; each is
#: also its result key, except ``"recall"`` which gives one ``"recall@<k>"`` per k.
METRIC_NAMES = ("recall", "map@r", "r_precision", "precision@1", "nmi")
#: Old request spellings, accepted for one release (they give the keys above).
METRIC_ALIASES = {"map_at_r": "map@r", "precision_at_1": "precision@1"}


def resolve_metric_names(metrics: str | Iterable[str]) -> tuple[str, ...]:
    """Canonical metric names for a request (aliases mapped, order kept, duplicates dropped).

    Args:
        metrics: a name or names from :data:`METRIC_NAMES` or :data:`METRIC_ALIASES`.

    Returns:
        The canonical names.

    Raises:
        ValueError: on an unknown or empty request.
    """
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in names if m not in METRIC_NAMES and m not in METRIC_ALIASES]
    if unknown:
        raise ValueError(
            f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)} "
            f"(old spellings {list(METRIC_ALIASES)} are accepted too)."
        )
    if not names:
        raise ValueError(f"metrics is empty; choose from {list(METRIC_NAMES)}.")
    return tuple(dict.fromkeys(METRIC_ALIASES.get(m, m) for m in names))


def metric_keys(ks: Sequence[int], metrics: str | Iterable[str]) -> list[str]:
    """The result keys of a request, in request order, e.g. ``["recall@1", "recall@2", "map@r"]``.

    Raises:
        ValueError: on an unknown metric or bad ``ks`` (when ``"recall"`` is requested).
    """
    keys: list[str] = []
    for name in resolve_metric_names(metrics):
        keys += [f"recall@{k}" for k in validate_ks(ks)] if name == "recall" else [name]
    return keys


def recall_from_ranks(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Recall@k from each query's first-positive rank (a hit iff ``rank < k``)."""
    return {f"recall@{k}": float(np.mean(ranks < k)) for k in ks}


def calculate_recall_at_k(knn_labels: np.ndarray, query_labels: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
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
    ks = validate_ks(ks)
    if max(ks) > knn_labels.shape[1]:
        raise ValueError(f"need at least {max(ks)} neighbours per query, got {knn_labels.shape[1]}.")
    match = knn_labels == np.asarray(query_labels)[:, None]
    first_hit = np.where(match.any(axis=1), match.argmax(axis=1), np.iinfo(np.int64).max)
    return recall_from_ranks(first_hit, ks)


def _not_lone(r: np.ndarray) -> np.ndarray:
    mask = np.asarray(r) > 0
    if not mask.any():
        warnings.warn(
            "No query has a same-class item in the gallery; precision@1, R-precision and MAP@R are reported as 0.",
            RuntimeWarning,
            stacklevel=3,
        )
    return mask


def calculate_precision_at_1(knn_labels: np.ndarray, query_labels: np.ndarray, r: np.ndarray) -> float:
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
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(match, R)`` restricted to the first R neighbours of each non-lone query."""
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
    return (knn_labels == query_labels[:, None]) & relevant, r


def _mean_over_queries(
    knn_labels: np.ndarray,
    query_labels: np.ndarray,
    r: np.ndarray,
    per_query: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> float:
    """Mean of ``per_query(match, R)`` over the non-lone queries (0.0 when all are lone)."""
    rel = _relevance(knn_labels, query_labels, r)
    if rel is None:
        return 0.0
    return float(np.mean(per_query(*rel)))


def calculate_r_precision(knn_labels: np.ndarray, query_labels: np.ndarray, r: np.ndarray) -> float:
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
    return _mean_over_queries(knn_labels, query_labels, r, lambda match, r_eff: match.sum(axis=1) / r_eff)


def calculate_mean_average_precision_at_r(knn_labels: np.ndarray, query_labels: np.ndarray, r: np.ndarray) -> float:
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
    return _mean_over_queries(knn_labels, query_labels, r, _average_precision_at_r)


def _average_precision_at_r(match: np.ndarray, r_eff: np.ndarray) -> np.ndarray:
    """AP@R per query from its match row (already restricted to the first R neighbours)."""
    ranks = np.arange(1, match.shape[1] + 1, dtype=np.float64)[None, :]
    precision_at_i = np.cumsum(match, axis=1) / ranks
    return (precision_at_i * match).sum(axis=1) / r_eff
