"""The interface every deep-metric-learning (DML) base loss implements.

A base loss is a Keras layer so that proxy-based losses can own their proxies
as weights (saved with the model, trained by the optimizer). The math of each
loss lives in a pure function ``fn(embeddings, labels, ...) -> scalar``; the
layer is a thin wrapper that carries the hyper-parameters into ``get_config``.

``DRegModel`` creates one instance per flow head through :func:`get` so that
each head has its own proxies.
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="detreg_keras")
class DMLLoss(keras.layers.Layer):
    """Base class of the DML losses: ``loss = layer(embeddings, labels)``.

    Subclasses implement :meth:`compute` (embeddings ``[B, D]`` float, labels
    ``[B]`` int, returns a scalar). Embeddings are L2-normalised by the caller
    (``DRegModel``) but the pure functions normalise again where the paper's
    formula is a cosine, so they are safe to call on raw vectors.

    Args:
        num_classes: number of training classes (labels lie in ``[0, num_classes)``).
            Proxy-based losses need it; pair-based losses may leave it ``None``.
        embedding_dim: dimension ``D`` of the embeddings; proxy-based losses need it.
        **kwargs: passed to ``keras.layers.Layer`` (``name``, ``dtype`` ...).
    """

    #: Name under which ``DRegModel`` logs this loss (``pa_loss`` for Proxy Anchor).
    metric_name: str = "dml_loss"
    #: True when the loss owns class proxies (they get the proxy learning rate).
    has_proxies: bool = False

    def __init__(self, num_classes: int | None = None, embedding_dim: int | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.embedding_dim = None if embedding_dim is None else int(embedding_dim)

    def build(self, input_shape=None):  # noqa: D102  (pair-based losses own no weights)
        self.built = True

    def call(self, embeddings, labels):
        embeddings = tf.cast(embeddings, tf.float32)
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        return self.compute(embeddings, labels)

    def compute(self, embeddings: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """Return the scalar loss for a batch; implemented by subclasses."""
        raise NotImplementedError

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "embedding_dim": self.embedding_dim})
        return config
