"""Clustering quality: k-means (faiss Lloyd iterations, k-means++ seeding) and NMI.

**NMI**: k-means on the query embeddings with k = number of distinct query
labels, then ``sklearn.metrics.normalized_mutual_info_score``. Like
``AccuracyCalculator`` the Lloyd iterations run with faiss (20 iterations, on
the GPU when available); unlike it, the centroids are seeded with k-means++
(Arthur & Vassilvitskii 2007, in numpy) from a fixed seed, which makes the score
reproducible and much less sensitive to a bad random start.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from detreg_keras.metrics._checks import (
    ArrayLike,
    UseGpu,
    as_labels,
    as_matrix,
    l2_normalize,
)
from detreg_keras.metrics.search import resolve_use_gpu

__all__ = ["KMEANS_INITS", "calculate_nmi", "kmeans_cluster", "nmi"]

#: Centroid seedings of :func:`kmeans_cluster`.
KMEANS_INITS = ("k-means++", "random")
KMeansInit = Literal["k-means++", "random"]


def _kmeans_pp_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007), O(N * k * D).

    Kept in numpy rather than ``sklearn.cluster.kmeans_plusplus``: on the
    Omniglot test split (2120 x 784, k = 106) scikit-learn's took 3.1 s per call
    with one candidate per step and 19 s with its greedy default, against 0.6 s
    here, for the same NMI (48.8-48.9 vs 49.1, 5 seeds).
    """
    n = x.shape[0]
    sq_norms = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    chosen = [int(rng.integers(n))]
    d2 = np.maximum(sq_norms - 2.0 * (x @ x[chosen[0]]) + sq_norms[chosen[0]], 0.0)
    for _ in range(1, k):
        total = d2.sum()
        idx = int(rng.integers(n)) if total <= 0.0 else int(rng.choice(n, p=d2 / total))  # <=0: duplicates
        chosen.append(idx)
        d2 = np.minimum(d2, np.maximum(sq_norms - 2.0 * (x @ x[idx]) + sq_norms[idx], 0.0))
    return np.ascontiguousarray(x[chosen], dtype=np.float32)


def kmeans_cluster(
    x: ArrayLike,
    num_clusters: int,
    *,
    seed: int = 0,
    niter: int = 20,
    init: KMeansInit = "k-means++",
    use_gpu: UseGpu = "auto",
) -> np.ndarray:
    """Clusters the rows of ``x`` with faiss k-means and returns cluster ids.

    Args:
        x: [N, D] vectors.
        num_clusters: number of clusters, ``1 <= num_clusters <= N``.
        seed: random seed (initialisation and faiss sampling).
        niter: Lloyd iterations (20, as AccuracyCalculator).
        init: ``"k-means++"`` seeding (computed in numpy, O(N * k * D)) or faiss's ``"random"`` sampling of initial centroids.
        use_gpu: as in :class:`~detreg_keras.metrics.search.FaissKNN`.

    Returns:
        int64 [N] cluster assignment.

    Raises:
        ValueError: on bad ``x``, ``num_clusters`` outside ``[1, N]`` or an unknown ``init``.
    """
    import faiss  # noqa: PLC0415 (heavy; only k-means needs it)

    x = as_matrix(x, "x")
    n, d = x.shape
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be in [1, {n}], got {num_clusters}.")
    if init not in KMEANS_INITS:
        raise ValueError(f"init must be one of {list(KMEANS_INITS)}, got {init!r}.")
    km = faiss.Kmeans(
        d,
        int(num_clusters),
        niter=int(niter),
        seed=int(seed),
        verbose=False,
        gpu=resolve_use_gpu(use_gpu),
        min_points_per_centroid=1,
    )
    init_centroids = _kmeans_pp_init(x, int(num_clusters), np.random.default_rng(seed)) if init == "k-means++" else None
    km.train(x, init_centroids=init_centroids)
    _, assign = km.index.search(x, 1)
    return assign[:, 0].astype(np.int64)


def calculate_nmi(query_labels: np.ndarray, cluster_labels: np.ndarray) -> float:
    """``sklearn.metrics.normalized_mutual_info_score(query_labels, cluster_labels)``."""
    from sklearn.metrics import normalized_mutual_info_score  # noqa: PLC0415 (sklearn loads slowly)

    return float(normalized_mutual_info_score(np.asarray(query_labels), np.asarray(cluster_labels)))


def nmi(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    normalize: bool = True,
    seed: int = 0,
    niter: int = 20,
    init: KMeansInit = "k-means++",
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
        use_gpu: see :func:`kmeans_cluster`.

    Returns:
        NMI in [0, 1].
    """
    x = as_matrix(embeddings, "embeddings")
    y = as_labels(labels, "labels", x.shape[0])
    if normalize:
        x = l2_normalize(x)
    clusters = kmeans_cluster(x, len(np.unique(y)), seed=seed, niter=niter, init=init, use_gpu=use_gpu)
    return calculate_nmi(y, clusters)
