"""detreg-keras: Determinant Regularization for Deep Metric Learning on Keras 3.

The package implements the dueling normalizing-flow metric heads, the
determinant regularizer (paper Eq. 6, 7 and 10), between-sample augmentation,
Proxy Anchor and the training recipe of "Determinant Regularization for Deep
Metric Learning", with retrieval metrics and export paths.

Importing the package registers every custom layer and model with Keras, so
``keras.models.load_model("model.keras")`` works after ``import detreg_keras``.
"""

from __future__ import annotations

from detreg_keras._backend import ensure_tensorflow_backend, prefer_onednn
from detreg_keras._tf_logging import import_tensorflow

prefer_onednn()  # before TensorFlow's first import (see detreg_keras._backend)
import_tensorflow()  # its start-up C++ log lines obey TF_CPP_MIN_LOG_LEVEL (see detreg_keras._tf_logging)
ensure_tensorflow_backend()

# The imports below register the custom objects with Keras serialization.
from detreg_keras import augment, backbones, data, flows, losses, metrics, optim, regularizers  # noqa: E402
from detreg_keras.augment import between_sample_augment  # noqa: E402
from detreg_keras.backbones import ImagePreprocessing, build_backbone  # noqa: E402
from detreg_keras.flows import (  # noqa: E402
    AdditiveCoupling,
    AffineCoupling,
    DiagonalScale,
    NICEFlow,
    RealNVPFlow,
    build_flow,
)
from detreg_keras.losses import DMLLoss, ProxyAnchorLoss, proxy_anchor_loss  # noqa: E402
from detreg_keras.metrics import evaluate_embeddings, recall_at_k  # noqa: E402
from detreg_keras.model import DRegModel, EmbeddingHead, load_model  # noqa: E402
from detreg_keras.optim import GroupAdamW, make_optimizer  # noqa: E402
from detreg_keras.regularizers import DeterminantRegularizer, determinant_regularizer  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "DMLLoss",
    "DRegModel",
    "DeterminantRegularizer",
    "DiagonalScale",
    "EmbeddingHead",
    "GroupAdamW",
    "ImagePreprocessing",
    "NICEFlow",
    "ProxyAnchorLoss",
    "RealNVPFlow",
    "augment",
    "backbones",
    "between_sample_augment",
    "build_backbone",
    "build_flow",
    "data",
    "determinant_regularizer",
    "evaluate_embeddings",
    "flows",
    "load_model",
    "losses",
    "make_optimizer",
    "metrics",
    "optim",
    "proxy_anchor_loss",
    "recall_at_k",
    "regularizers",
]
