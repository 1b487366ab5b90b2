"""Proxy Anchor loss (Kim et al., CVPR 2020), the base loss of the DReg paper.

For L2-normalised embeddings ``x_i``, proxies ``p_c`` and cosine ``s(x, p)``:

    L = 1/|P+| Σ_{p ∈ P+} log(1 + Σ_{x ∈ X_p^+} exp(-α (s(x, p) - δ)))
      + 1/|P|  Σ_{p ∈ P}  log(1 + Σ_{x ∈ X_p^-} exp( α (s(x, p) + δ)))

where ``P`` are all proxies, ``P+`` the proxies with at least one positive in
the batch, ``X_p^+`` the batch samples of the proxy's class and ``X_p^-`` the
others. This matches the official implementation (``losses.Proxy_Anchor``),
computed in the stable form ``log(1 + Σ exp a) = logsumexp([0, a...])``.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from detreg_keras.losses.base import ProxyLoss


def _masked_log1p_sum_exp(logits: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """``log(1 + Σ_i mask_i · exp(logits_i))`` along axis 0, computed stably.

    Args:
        logits: ``[B, C]`` exponents.
        mask: ``[B, C]`` boolean, which entries enter the sum.

    Returns:
        ``[C]`` values; a column with an empty mask gives ``log 1 = 0``.
    """
    neg_inf = tf.constant(-math.inf, logits.dtype)
    masked = tf.where(mask, logits, neg_inf)
    zeros = tf.zeros_like(masked[:1])
    return tf.reduce_logsumexp(tf.concat([zeros, masked], axis=0), axis=0)


def proxy_anchor_loss(
    embeddings: tf.Tensor,
    labels: tf.Tensor,
    proxies: tf.Tensor,
    margin: float = 0.1,
    alpha: float = 32.0,
) -> tf.Tensor:
    """Proxy Anchor loss of a batch (official formulation, stable logsumexp form).

    Args:
        embeddings: ``[B, D]`` embeddings (normalised inside).
        labels: ``[B]`` integer class labels in ``[0, C)``.
        proxies: ``[C, D]`` class proxies (normalised inside).
        margin: the margin δ (paper: 0.1).
        alpha: the scale α (paper: 32).

    Returns:
        Scalar loss: positive term averaged over the proxies that have positives
        in the batch, negative term averaged over all ``C`` proxies.
    """
    embeddings = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1, epsilon=1e-12)
    proxies = tf.math.l2_normalize(tf.cast(proxies, tf.float32), axis=-1, epsilon=1e-12)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    num_classes = tf.shape(proxies)[0]
    cos = tf.matmul(embeddings, proxies, transpose_b=True)  # [B, C]
    positive = tf.one_hot(labels, num_classes, on_value=True, off_value=False, dtype=tf.bool)
    pos_term_per_proxy = _masked_log1p_sum_exp(-alpha * (cos - margin), positive)
    neg_term_per_proxy = _masked_log1p_sum_exp(alpha * (cos + margin), tf.logical_not(positive))
    has_positive = tf.reduce_any(positive, axis=0)
    num_valid = tf.reduce_sum(tf.cast(has_positive, tf.float32))
    pos_term = tf.math.divide_no_nan(tf.reduce_sum(pos_term_per_proxy), num_valid)
    neg_term = tf.reduce_sum(neg_term_per_proxy) / tf.cast(num_classes, tf.float32)
    return pos_term + neg_term


@keras.saving.register_keras_serializable(package="detreg_keras")
class ProxyAnchorLoss(ProxyLoss):
    """Keras wrapper of :func:`proxy_anchor_loss` that owns one proxy per class.

    Proxies are initialised as in the official code,
    ``kaiming_normal_(proxies, mode='fan_out')`` on a ``[C, D]`` tensor, i.e.
    ``N(0, 2 / C)``.

    Args:
        num_classes: number of training classes ``C``.
        embedding_dim: embedding dimension ``D``.
        margin: δ (paper: 0.1).
        alpha: α (paper: 32).
        **kwargs: passed to :class:`DMLLoss`.
    """

    metric_name = "pa_loss"
    loss_fn = staticmethod(proxy_anchor_loss)

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.1, alpha: float = 32.0, **kwargs):
        hyper = {"margin": float(margin), "alpha": float(alpha)}
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper=hyper, **kwargs)

    def proxy_initializer(self) -> keras.initializers.Initializer:
        return keras.initializers.RandomNormal(stddev=math.sqrt(2.0 / self.num_classes))
