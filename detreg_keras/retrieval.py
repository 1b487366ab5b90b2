"""Moved to the TensorFlow-free runtime :mod:`detreg_runtime`; these aliases are kept for one release.

* :class:`Embedder`, :func:`default_providers` → :mod:`detreg_runtime.embedder`
* :class:`EmbeddingIndex`, :class:`Matches`, :func:`recall_against_exact` → :mod:`detreg_runtime.index`
* :func:`load_image`, :func:`list_image_folder`, :func:`image_header_size`,
  :data:`IMAGE_EXTENSIONS` → :mod:`detreg_runtime.imaging`

Importing ``detreg_keras.retrieval`` imports TensorFlow (through
``detreg_keras``); import from ``detreg_runtime`` in a serving process.
"""

from detreg_runtime.embedder import Embedder, default_providers
from detreg_runtime.imaging import IMAGE_EXTENSIONS, image_header_size, list_image_folder, load_image
from detreg_runtime.index import (
    IDS_FILE,
    INDEX_FILE,
    INDEX_FORMAT,
    INDEX_FORMAT_VERSION,
    INDEX_KINDS,
    LABELS_FILE,
    METADATA_FILE,
    EmbeddingIndex,
    Matches,
    recall_against_exact,
)

__all__ = [
    "IDS_FILE",
    "IMAGE_EXTENSIONS",
    "INDEX_FILE",
    "INDEX_FORMAT",
    "INDEX_FORMAT_VERSION",
    "INDEX_KINDS",
    "LABELS_FILE",
    "METADATA_FILE",
    "Embedder",
    "EmbeddingIndex",
    "Matches",
    "default_providers",
    "image_header_size",
    "list_image_folder",
    "load_image",
    "recall_against_exact",
]
