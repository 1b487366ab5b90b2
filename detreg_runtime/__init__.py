"""detreg_runtime: the TensorFlow-free serving runtime of detreg-keras.

Everything a deployed model needs, on numpy, PIL/simplejpeg, onnxruntime and
faiss only (no TensorFlow, Keras or TFP; importing it takes well under a
second): the image decoder (:mod:`~detreg_runtime.imaging`), the ONNX embedder
(:mod:`~detreg_runtime.embedder`), the faiss index (:mod:`~detreg_runtime.index`)
on the one faiss wrapper that evaluation uses too (:mod:`~detreg_runtime.search`,
with the numpy checks and ``l2_normalize`` of :mod:`~detreg_runtime.arrays`),
verification thresholds (:mod:`~detreg_runtime.verification`), the HTTP service
(:mod:`~detreg_runtime.service`, ``detreg-serve`` / ``python -m detreg_runtime``)
and the index command line (:mod:`~detreg_runtime.index_cli`, ``detreg-index``).
The export half (ONNX, SavedModel) lives in :mod:`detreg_keras.export`, which
needs TensorFlow.
"""

from detreg_runtime._version import detreg_version
from detreg_runtime.embedder import Embedder, default_providers
from detreg_runtime.imaging import IMAGE_EXTENSIONS, list_image_folder, load_image
from detreg_runtime.index import EmbeddingIndex, Matches, recall_against_exact

__all__ = [
    "IMAGE_EXTENSIONS",
    "Embedder",
    "EmbeddingIndex",
    "Matches",
    "default_providers",
    "detreg_version",
    "list_image_folder",
    "load_image",
    "recall_against_exact",
]
