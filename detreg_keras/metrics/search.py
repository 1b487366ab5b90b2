"""The faiss search backend of the metrics: a re-export of :mod:`detreg_runtime.search`.

The one faiss wrapper (:class:`FaissKNN`, :func:`knn_search`,
:func:`build_faiss_index`, :func:`search_faiss_index`,
:func:`resolve_index_params`) is TensorFlow-free and lives in the serving
runtime, so that evaluation and :class:`~detreg_runtime.index.EmbeddingIndex`
build and search indexes with the same code. Import it from either module.
"""

from __future__ import annotations

from detreg_runtime import search as _runtime_search
from detreg_runtime.search import (  # noqa: F401  (re-exported: __all__ below)
    DEFAULT_CHUNK_SIZE,
    INDEX_KINDS,
    FaissKNN,
    build_faiss_index,
    check_index_kind,
    gpu_available,
    knn_search,
    resolve_index_params,
    resolve_use_gpu,
    search_faiss_index,
)

__all__ = list(_runtime_search.__all__)
