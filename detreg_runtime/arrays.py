"""Numpy-only input checks and row normalisation shared by the search code, the metrics and serving.

Every check raises ``ValueError`` naming the argument, the bad value and what
is expected, so that a wrong call fails at the boundary and not deep inside
faiss or numpy. No TensorFlow: the serving runtime and
:mod:`detreg_keras.metrics` both import from here.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

__all__ = ["ArrayLike", "UseGpu", "as_matrix", "check_positive_int", "is_int", "l2_normalize"]

ArrayLike = Any
UseGpu = bool | Literal["auto"]


def as_matrix(x: ArrayLike, name: str) -> np.ndarray:
    """Returns ``x`` as a C-contiguous float32 ``[N, D]`` array.

    Args:
        x: array-like of real numbers.
        name: argument name used in error messages.

    Returns:
        A float32 C-contiguous array (a copy when the input was not one).

    Raises:
        ValueError: if ``x`` is not 2-D, is empty, is not real-valued numeric,
            or holds NaN/Inf (the message gives the first bad row).
    """
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name} could not be converted to an array: {exc}") from exc
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of shape [num_items, dim], got shape {arr.shape}.")
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


def is_int(value: Any) -> bool:
    """True for Python/numpy integers, False for bools and everything else."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def check_positive_int(value: Any, name: str, *, allow_none: bool = False) -> int | None:
    """Returns ``int(value)`` if it is an integer ``>= 1`` (or ``None`` when allowed).

    Raises:
        ValueError: naming ``name`` and the bad value.
    """
    if value is None and allow_none:
        return None
    if not is_int(value) or value < 1:
        suffix = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive integer{suffix}, got {value!r}.")
    return int(value)


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
