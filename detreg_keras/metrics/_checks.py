"""Input validation of the metrics (numpy only): labels, ``ks`` and the evaluation inputs.

The array checks shared with the search code and the serving runtime
(:func:`as_matrix`, :func:`is_int`, :func:`check_positive_int`,
:func:`l2_normalize`) live in :mod:`detreg_runtime.arrays` and are re-exported
here. Every check raises ``ValueError`` naming the argument, the bad value and what
is expected, so that a wrong call fails at the boundary and not deep inside
faiss or numpy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from detreg_runtime.arrays import (  # noqa: F401  (re-exported: the metrics import them from here)
    ArrayLike,
    UseGpu,
    as_matrix,
    check_positive_int,
    is_int,
    l2_normalize,
)


def as_labels(y: ArrayLike, name: str, num_items: int) -> np.ndarray:
    """Returns labels as a 1-D array of length ``num_items`` (``[N, 1]`` is flattened).

    Raises:
        ValueError: on another shape or a length that differs from ``num_items``.
    """
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
            f"{name} has {arr.shape[0]} entries but there are {num_items} embeddings; they must match one to one."
        )
    return arr


def validate_ks(ks: int | Iterable[int]) -> tuple[int, ...]:
    """Returns ``ks`` as a non-empty tuple of integers ``>= 1``.

    Raises:
        ValueError: on an empty sequence, a non-integer or a ``k < 1``.
    """
    ks = (int(ks),) if is_int(ks) else tuple(ks)
    if not ks:
        raise ValueError("ks must contain at least one k, got an empty sequence.")
    for k in ks:
        if not is_int(k):
            raise ValueError(f"every k in ks must be an integer, got {k!r} in {ks!r}.")
        if k < 1:
            raise ValueError(f"every k in ks must be >= 1, got {k} in {ks!r}.")
    return tuple(int(k) for k in ks)


def same_class_counts(query_labels: np.ndarray, gallery_labels: np.ndarray, *, same_source: bool) -> np.ndarray:
    """Number of gallery items sharing each query's label (R per query).

    Args:
        query_labels: [Nq] labels.
        gallery_labels: [Ng] labels.
        same_source: all-vs-all mode; the query itself is subtracted.

    Returns:
        int64 [Nq].
    """
    uniq, counts = np.unique(gallery_labels, return_counts=True)
    pos = np.minimum(np.searchsorted(uniq, query_labels), len(uniq) - 1)
    found = uniq[pos] == query_labels
    r = np.where(found, counts[pos], 0).astype(np.int64)
    return r - 1 if same_source else r


@dataclass(frozen=True)
class EvalInputs:
    """Validated, coded and (optionally) normalised inputs of an evaluation.

    Attributes:
        query: float32 [Nq, D] queries (the gallery itself in all-vs-all mode).
        gallery: float32 [Ng, D] gallery.
        query_labels: int64 [Nq] label codes shared with ``gallery_labels``.
        gallery_labels: int64 [Ng] label codes.
        same_source: all-vs-all mode (each query is excluded from its gallery by index).
        r: int64 [Nq] same-class gallery items per query (R).
    """

    query: np.ndarray
    gallery: np.ndarray
    query_labels: np.ndarray
    gallery_labels: np.ndarray
    same_source: bool
    r: np.ndarray

    @property
    def available(self) -> int:
        """Gallery items each query can be ranked against."""
        return self.gallery.shape[0] - (1 if self.same_source else 0)

    def check_depth(self, k: int) -> None:
        """Raises ``ValueError`` if ``k`` neighbours per query cannot exist."""
        if k > self.available:
            raise ValueError(
                f"a kNN depth of {k} was requested but each query only has {self.available} gallery items"
                + (" (the query itself is excluded)" if self.same_source else "")
                + "; lower ks."
            )


def prepare_inputs(
    embeddings: ArrayLike,
    labels: ArrayLike,
    query_embeddings: ArrayLike | None = None,
    query_labels: ArrayLike | None = None,
    normalize: bool = True,
) -> EvalInputs:
    """Validates the evaluation inputs and maps the labels to shared integer codes.

    Args:
        embeddings: [N, D] embeddings (the gallery in query/gallery mode).
        labels: [N] class ids of any sortable dtype.
        query_embeddings: [Nq, D] queries (query/gallery mode) or ``None`` (all-vs-all).
        query_labels: [Nq] query class ids, given exactly when ``query_embeddings`` is.
        normalize: L2-normalise the vectors (cosine similarity).

    Returns:
        The :class:`EvalInputs`.

    Raises:
        ValueError: on any malformed input (see :func:`as_matrix`, :func:`as_labels`).
    """
    if (query_embeddings is None) != (query_labels is None):
        raise ValueError(
            "query_embeddings and query_labels must be given together (query/gallery "
            "mode) or both left out (all-vs-all mode)."
        )
    gallery = as_matrix(embeddings, "embeddings")
    g_labels = as_labels(labels, "labels", gallery.shape[0])
    same_source = query_embeddings is None
    query, q_labels = gallery, g_labels
    if not same_source:
        query = as_matrix(query_embeddings, "query_embeddings")
        q_labels = as_labels(query_labels, "query_labels", query.shape[0])
        if query.shape[1] != gallery.shape[1]:
            raise ValueError(
                f"query_embeddings have dimension {query.shape[1]} but embeddings "
                f"(the gallery) have dimension {gallery.shape[1]}."
            )
    try:
        _, codes = np.unique(np.concatenate([q_labels, g_labels]), return_inverse=True)
    except TypeError as exc:
        raise ValueError(f"labels must be mutually comparable class ids: {exc}") from exc
    codes = codes.reshape(-1).astype(np.int64)
    q_codes, g_codes = codes[: len(q_labels)], codes[len(q_labels):]
    if normalize:
        gallery = l2_normalize(gallery)
        query = gallery if same_source else l2_normalize(query)
    r = same_class_counts(q_codes, g_codes, same_source=same_source)
    return EvalInputs(query, gallery, q_codes, g_codes, same_source, r)
