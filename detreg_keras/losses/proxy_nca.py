"""ProxyNCA (Movshovitz-Attias et al., ICCV 2017) and ProxyNCA++ (Teh et al., ECCV 2020).

Both compare each sample to one learned proxy per class through the squared
Euclidean distance of unit vectors, ``d(x, p) = ||x̂ - p̂||² = 2 - 2 cos(x, p)``.

ProxyNCA (the paper's NCA ratio whose denominator holds the *other*
proxies only), with an optional scale ``s`` (PML's ``softmax_scale``, 1 by
default):

    L = 1/B Σ_i [ s d(x_i, p_{y_i}) + log Σ_{z ≠ y_i} exp(-s d(x_i, p_z)) ]

It can be negative. ProxyNCA++ (the positive proxy is in the
denominator, and a temperature T scales the distances):

    L = 1/B Σ_i -log( exp(-d(x_i, p_{y_i}) / T) / Σ_z exp(-d(x_i, p_z) / T) )

with ``T = 1/9`` (the paper's default). ProxyNCA++'s other ingredients (fast
proxy learning rate, global max pooling, layer norm) live in the optimizer and
the backbone, not in the loss.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from detreg_keras.losses import _pairs
from detreg_keras.losses.base import ProxyLoss


def _proxy_squared_distances(embeddings: tf.Tensor, proxies: tf.Tensor) -> tf.Tensor:
    """``[B, C]`` squared distances ``||x̂_i - p̂_c||² = 2 - 2 cos`` (clipped at 0)."""
    cos = tf.matmul(_pairs.l2_normalize(embeddings), _pairs.l2_normalize(proxies), transpose_b=True)
    return tf.maximum(2.0 - 2.0 * cos, 0.0)


def proxy_nca_loss(embeddings: tf.Tensor, labels: tf.Tensor, proxies: tf.Tensor, scale: float = 1.0) -> tf.Tensor:
    """ProxyNCA loss of a batch (the paper's ratio: positive proxy out of the denominator).

    Args:
        embeddings: ``[B, D]`` embeddings (normalised inside).
        labels: ``[B]`` integer labels in ``[0, C)``.
        proxies: ``[C, D]`` proxies (normalised inside).
        scale: ``s`` multiplying the distances (PML's ``softmax_scale``: 1).

    Returns:
        Scalar loss averaged over the batch (0 when there is a single proxy).
    """
    labels = _pairs.flat_labels(labels)
    logits = -scale * _proxy_squared_distances(embeddings, proxies)
    positive = tf.one_hot(labels, tf.shape(proxies)[0], on_value=True, off_value=False, dtype=tf.bool)
    pos_logit = tf.reduce_sum(tf.where(positive, logits, tf.zeros_like(logits)), axis=1)
    negative = tf.logical_not(positive)
    neg_lse = _pairs.masked_logsumexp(logits, negative, axis=1)
    return _pairs.masked_mean(neg_lse - pos_logit, tf.reduce_any(negative, axis=1))


def proxy_nca_pp_loss(
    embeddings: tf.Tensor, labels: tf.Tensor, proxies: tf.Tensor, temperature: float = 1.0 / 9.0
) -> tf.Tensor:
    """ProxyNCA++ loss of a batch: softmax cross-entropy over ``-d(x, p) / T``.

    Args:
        embeddings: ``[B, D]`` embeddings (normalised inside).
        labels: ``[B]`` integer labels in ``[0, C)``.
        proxies: ``[C, D]`` proxies (normalised inside).
        temperature: ``T`` (paper: 1/9).

    Returns:
        Scalar loss averaged over the batch.
    """
    labels = _pairs.flat_labels(labels)
    logits = -_proxy_squared_distances(embeddings, proxies) / temperature
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


@keras.saving.register_keras_serializable(package="detreg_keras")
class ProxyNCALoss(ProxyLoss):
    """Keras wrapper of :func:`proxy_nca_loss` (registry name ``"proxy_nca"``).

    Proxies are initialised ``N(0, 1)`` (PML's ``torch.randn``).

    Args:
        num_classes: number of training classes ``C``.
        embedding_dim: embedding dimension ``D``.
        scale: distance scale ``s`` (default 1).
        **kwargs: passed to :class:`DMLLoss`.
    """

    metric_name = "proxy_nca_loss"
    loss_fn = staticmethod(proxy_nca_loss)

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 1.0, **kwargs):
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper={"scale": float(scale)}, **kwargs)


@keras.saving.register_keras_serializable(package="detreg_keras")
class ProxyNCAPlusPlusLoss(ProxyLoss):
    """Keras wrapper of :func:`proxy_nca_pp_loss` (registry name ``"proxy_nca_pp"``).

    Proxies are initialised ``N(0, 1/64)`` (official code: ``randn / 8``).

    Args:
        num_classes: number of training classes ``C``.
        embedding_dim: embedding dimension ``D``.
        temperature: ``T`` (default 1/9).
        **kwargs: passed to :class:`DMLLoss`.
    """

    metric_name = "proxy_nca_pp_loss"
    loss_fn = staticmethod(proxy_nca_pp_loss)
    proxy_stddev = 1.0 / 8.0

    def __init__(self, num_classes: int, embedding_dim: int, temperature: float = 1.0 / 9.0, **kwargs):
        hyper = {"temperature": float(temperature)}
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper=hyper, **kwargs)
