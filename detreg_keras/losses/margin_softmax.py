"""Normalized softmax, CosFace and ArcFace: softmax cross-entropy on cosine logits.

All three learn a class weight matrix ``W`` (``[C, D]``, stored as the weight
``proxies`` so that the optimizer's proxy learning-rate group catches it;
``N(0, 1)`` init, as PML) and use ``cos θ_{i,c} = x̂_iᵀŵ_c`` of unit vectors;
each loss is :func:`cosine_softmax_loss` with its own logits of the cosines:

* Normalized softmax (Zhai & Wu, BMVC 2019, "Classification is a strong
  baseline for deep metric learning"): logits ``cos θ / T``, ``T = 0.05``.
* CosFace / large-margin cosine loss (Wang et al., CVPR 2018): target
  logit ``s (cos θ_y - m)``, others ``s cos θ``; ``s = 64``, ``m = 0.35``.
* ArcFace / additive angular margin (Deng et al., CVPR 2019): target
  logit ``s cos(θ_y + m)``, others ``s cos θ``; ``s = 64``, ``m = 0.5`` rad.
  ``cos(θ + m) = cos θ cos m - sin θ sin m`` with ``sin θ = sqrt(1 - cos² θ)``
  (no ``arccos``, whose gradient is infinite at ±1); where ``θ + m > π`` the
  official insightface fallback ``cos θ - m sin m`` keeps the logit monotonic.

    L = 1/B Σ_i -log softmax(logits_i)_{y_i}

Defaults are pytorch-metric-learning's (``NormalizedSoftmaxLoss``,
``CosFaceLoss``, ``ArcFaceLoss`` with 28.6° = 0.5 rad) and the papers'.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import tensorflow as tf

from detreg_keras.losses import _pairs
from detreg_keras.losses.base import ProxyLoss


def _cosine_logits(embeddings: tf.Tensor, proxies: tf.Tensor) -> tf.Tensor:
    """``[B, C]`` cosines between the normalised embeddings and class weights."""
    return tf.matmul(_pairs.l2_normalize(embeddings), _pairs.l2_normalize(proxies), transpose_b=True)


def _cross_entropy(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def cosine_softmax_loss(
    embeddings: tf.Tensor,
    labels: tf.Tensor,
    proxies: tf.Tensor,
    logits_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
) -> tf.Tensor:
    """Mean cross-entropy of the logits ``logits_fn(cos, labels)`` of the cosines to the class weights.

    The common form of the three losses of this module; each one only says how
    its logits come from the ``[B, C]`` cosines ``cos θ`` and the labels.

    Args:
        embeddings: ``[B, D]`` embeddings (normalised inside).
        labels: ``[B]`` integer labels in ``[0, C)``.
        proxies: ``[C, D]`` class weights (normalised inside).
        logits_fn: ``(cos [B, C], labels [B]) -> logits [B, C]``.

    Returns:
        Scalar mean cross-entropy.
    """
    labels = _pairs.flat_labels(labels)
    return _cross_entropy(labels, logits_fn(_cosine_logits(embeddings, proxies), labels))


def normalized_softmax_loss(
    embeddings: tf.Tensor, labels: tf.Tensor, proxies: tf.Tensor, temperature: float = 0.05
) -> tf.Tensor:
    """Normalized softmax loss: cross-entropy of ``cos θ / T``.

    Args:
        embeddings: ``[B, D]`` embeddings (normalised inside).
        labels: ``[B]`` integer labels in ``[0, C)``.
        proxies: ``[C, D]`` class weights (normalised inside).
        temperature: ``T`` (0.05).

    Returns:
        Scalar mean cross-entropy.
    """
    return cosine_softmax_loss(embeddings, labels, proxies, lambda cos, _: cos / temperature)


def cosface_logits(cos: tf.Tensor, labels: tf.Tensor, scale: float = 64.0, margin: float = 0.35) -> tf.Tensor:
    """CosFace logits ``s (cos θ - m 1[c = y])`` of ``[B, C]`` cosines."""
    onehot = tf.one_hot(labels, tf.shape(cos)[1], dtype=cos.dtype)
    return scale * (cos - margin * onehot)


def cosface_loss(
    embeddings: tf.Tensor, labels: tf.Tensor, proxies: tf.Tensor, scale: float = 64.0, margin: float = 0.35
) -> tf.Tensor:
    """CosFace (large margin cosine) loss: cross-entropy of ``s (cos θ - m 1[c = y])``.

    Args:
        embeddings: ``[B, D]`` embeddings (normalised inside).
        labels: ``[B]`` integer labels in ``[0, C)``.
        proxies: ``[C, D]`` class weights (normalised inside).
        scale: ``s`` (64).
        margin: ``m`` (0.35).

    Returns:
        Scalar mean cross-entropy.
    """
    return cosine_softmax_loss(embeddings, labels, proxies, lambda cos, y: cosface_logits(cos, y, scale, margin))


def arcface_logits(cos: tf.Tensor, labels: tf.Tensor, scale: float = 64.0, margin: float = 0.5) -> tf.Tensor:
    """ArcFace logits ``s cos(θ + m 1[c = y])`` of ``[B, C]`` cosines (with insightface's fallback past π)."""
    cos = tf.clip_by_value(cos, -1.0, 1.0)
    sin = tf.sqrt(tf.clip_by_value(1.0 - tf.square(cos), 1e-7, 1.0))
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    phi = cos * cos_m - sin * sin_m  # cos(θ + m)
    phi = tf.where(cos > math.cos(math.pi - margin), phi, cos - math.sin(math.pi - margin) * margin)
    onehot = tf.one_hot(labels, tf.shape(cos)[1], on_value=True, off_value=False, dtype=tf.bool)
    return scale * tf.where(onehot, phi, cos)


def arcface_loss(
    embeddings: tf.Tensor, labels: tf.Tensor, proxies: tf.Tensor, scale: float = 64.0, margin: float = 0.5
) -> tf.Tensor:
    """ArcFace (additive angular margin) loss: cross-entropy of ``s cos(θ + m 1[c = y])``.

    Args:
        embeddings: ``[B, D]`` embeddings (normalised inside).
        labels: ``[B]`` integer labels in ``[0, C)``.
        proxies: ``[C, D]`` class weights (normalised inside).
        scale: ``s`` (64).
        margin: ``m`` in radians (0.5).

    Returns:
        Scalar mean cross-entropy.
    """
    return cosine_softmax_loss(embeddings, labels, proxies, lambda cos, y: arcface_logits(cos, y, scale, margin))


@keras.saving.register_keras_serializable(package="detreg_keras")
class NormalizedSoftmaxLoss(ProxyLoss):
    """Keras wrapper of :func:`normalized_softmax_loss` (registry name ``"normalized_softmax"``).

    Args:
        num_classes: number of training classes ``C``.
        embedding_dim: embedding dimension ``D``.
        temperature: ``T`` (default 0.05).
        **kwargs: passed to :class:`DMLLoss`.
    """

    metric_name = "normalized_softmax_loss"
    loss_fn = staticmethod(normalized_softmax_loss)

    def __init__(self, num_classes: int, embedding_dim: int, temperature: float = 0.05, **kwargs):
        hyper = {"temperature": float(temperature)}
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper=hyper, **kwargs)


class _MarginCosineLoss(ProxyLoss):
    """CosFace and ArcFace: scale ``s`` and a margin ``m`` on the target logit.

    Args:
        num_classes: number of training classes ``C``.
        embedding_dim: embedding dimension ``D``.
        scale: ``s`` (default 64).
        margin: ``m`` (default :attr:`default_margin` of the loss: CosFace 0.35, ArcFace 0.5 rad).
        **kwargs: passed to :class:`DMLLoss`.
    """

    #: The paper's (and PML's) margin, used when ``margin`` is ``None``.
    default_margin: float = 0.0

    def __init__(
        self, num_classes: int, embedding_dim: int, scale: float = 64.0, margin: float | None = None, **kwargs
    ):
        margin = self.default_margin if margin is None else margin
        hyper = {"scale": float(scale), "margin": float(margin)}
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper=hyper, **kwargs)


@keras.saving.register_keras_serializable(package="detreg_keras")
class CosFaceLoss(_MarginCosineLoss):
    """Keras wrapper of :func:`cosface_loss` (registry name ``"cosface"``); arguments of
    :class:`_MarginCosineLoss`, default ``scale = 64``, ``margin = 0.35``."""

    metric_name = "cosface_loss"
    loss_fn = staticmethod(cosface_loss)
    default_margin = 0.35


@keras.saving.register_keras_serializable(package="detreg_keras")
class ArcFaceLoss(_MarginCosineLoss):
    """Keras wrapper of :func:`arcface_loss` (registry name ``"arcface"``); arguments of
    :class:`_MarginCosineLoss`, default ``scale = 64``, ``margin = 0.5`` rad."""

    metric_name = "arcface_loss"
    loss_fn = staticmethod(arcface_loss)
    default_margin = 0.5
