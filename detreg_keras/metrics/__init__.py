"""Retrieval and clustering metrics for deep metric learning (numpy + faiss, no TensorFlow).

One module per job:

* :mod:`~detreg_keras.metrics.retrieval_metrics`: the metric definitions, one
  ``calculate_*`` function per metric on the neighbours' labels
  (pytorch-metric-learning's ``AccuracyCalculator``), and the metric names.
* :mod:`~detreg_keras.metrics.search`: the one faiss wrapper
  (:class:`FaissKNN`, :func:`build_faiss_index`, :func:`search_faiss_index`),
  shared by the evaluation and :class:`detreg_keras.retrieval.EmbeddingIndex`.
* :mod:`~detreg_keras.metrics.exact`: exact blocked first-positive ranks
  (Recall@k without kNN lists, memory bounded).
* :mod:`~detreg_keras.metrics.clustering`: k-means and NMI.
* :mod:`~detreg_keras.metrics.evaluate`: :func:`evaluate_embeddings`, which
  takes the search and clustering backends as ``knn_func`` / ``kmeans_func``,
  and its one-metric shortcuts.
* :mod:`~detreg_keras.metrics._checks`: input validation.

Metric names: the name you request is the key you get (``"map@r"``,
``"r_precision"``, ``"precision@1"``, ``"nmi"``; ``"recall"`` gives
``"recall@<k>"``). The old request spellings ``"map_at_r"`` and
``"precision_at_1"`` (:data:`METRIC_ALIASES`) are accepted for one release.
"""

from __future__ import annotations

from detreg_keras.metrics._checks import (
    EvalInputs,
    l2_normalize,
    prepare_inputs,
    same_class_counts,
)
from detreg_keras.metrics.clustering import calculate_nmi, kmeans_cluster, nmi
from detreg_keras.metrics.evaluate import (
    DEFAULT_MAX_R,
    evaluate_embeddings,
    map_at_r,
    precision_at_1,
    r_precision,
    recall_at_k,
    recall_at_k_exact,
)
from detreg_keras.metrics.exact import DEFAULT_MAX_BLOCK_BYTES, first_positive_ranks
from detreg_keras.metrics.retrieval_metrics import (
    METRIC_ALIASES,
    METRIC_NAMES,
    calculate_mean_average_precision_at_r,
    calculate_precision_at_1,
    calculate_r_precision,
    calculate_recall_at_k,
    metric_keys,
    resolve_metric_names,
)
from detreg_keras.metrics.search import (
    DEFAULT_CHUNK_SIZE,
    INDEX_KINDS,
    FaissKNN,
    build_faiss_index,
    knn_search,
    resolve_index_params,
    search_faiss_index,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_BLOCK_BYTES",
    "DEFAULT_MAX_R",
    "INDEX_KINDS",
    "METRIC_ALIASES",
    "METRIC_NAMES",
    "EvalInputs",
    "FaissKNN",
    "build_faiss_index",
    "calculate_mean_average_precision_at_r",
    "calculate_nmi",
    "calculate_precision_at_1",
    "calculate_r_precision",
    "calculate_recall_at_k",
    "evaluate_embeddings",
    "first_positive_ranks",
    "kmeans_cluster",
    "knn_search",
    "l2_normalize",
    "map_at_r",
    "metric_keys",
    "nmi",
    "precision_at_1",
    "prepare_inputs",
    "r_precision",
    "recall_at_k",
    "recall_at_k_exact",
    "resolve_index_params",
    "resolve_metric_names",
    "same_class_counts",
    "search_faiss_index",
]
