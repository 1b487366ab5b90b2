"""Normalized softmax, CosFace and ArcFace: softmax cross-entropy on cosine logits.

All three learn a class weight matrix ``W`` (``[C, D]``, stored as the weight
``proxies`` so that the optimizer's proxy learning-rate group catches it) and
use ``cos θ_{i,c} = x̂_iᵀŵ_c`` of unit vectors:

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

import keras
import tensorflow as tf

from detreg_keras.losses import _pairs
from detreg_keras.losses.base import ProxyLoss


def _cosine_logits(embeddings: tf.Tensor, proxies: tf.Tensor) -> tf.Tensor:
    """``[B, C]`` cosines between the normalised embeddings and class weights."""
    return tf.matmul(_pairs.l2_normalize(embeddings), _pairs.l2_normalize(proxies), transpose_b=True)


def _cross_entropy(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


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
    labels = _pairs.flat_labels(labels)
    return _cross_entropy(labels, _cosine_logits(embeddings, proxies) / temperature)


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
    labels = _pairs.flat_labels(labels)
    cos = _cosine_logits(embeddings, proxies)
    onehot = tf.one_hot(labels, tf.shape(cos)[1], dtype=cos.dtype)
    return _cross_entropy(labels, scale * (cos - margin * onehot))


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
    labels = _pairs.flat_labels(labels)
    cos = tf.clip_by_value(_cosine_logits(embeddings, proxies), -1.0, 1.0)
    sin = tf.sqrt(tf.clip_by_value(1.0 - tf.square(cos), 1e-7, 1.0))
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    phi = cos * cos_m - sin * sin_m  # cos(θ + m)
    phi = tf.where(cos > math.cos(math.pi - margin), phi, cos - math.sin(math.pi - margin) * margin)
    onehot = tf.one_hot(labels, tf.shape(cos)[1], on_value=True, off_value=False, dtype=tf.bool)
    return _cross_entropy(labels, scale * tf.where(onehot, phi, cos))


@keras.saving.register_keras_serializable(package="detreg_keras")
class NormalizedSoftmaxLoss(ProxyLoss):
    """Keras wrapper of :func:`normalized_softmax_loss` (registry name ``"normalized_softmax"``).

    Owns a ``[C, D]`` class weight matrix named ``proxies``, ``N(0, 1)`` init (PML).

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


@keras.saving.register_keras_serializable(package="detreg_keras")
class CosFaceLoss(ProxyLoss):
    """Keras wrapper of :func:`cosface_loss` (registry name ``"cosface"``).

    Owns a ``[C, D]`` class weight matrix named ``proxies``, ``N(0, 1)`` init (PML).

    Args:
        num_classes: number of training classes ``C``.
        embedding_dim: embedding dimension ``D``.
        scale: ``s`` (default 64).
        margin: ``m`` (default 0.35).
        **kwargs: passed to :class:`DMLLoss`.
    """

    metric_name = "cosface_loss"
    loss_fn = staticmethod(cosface_loss)

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0, margin: float = 0.35, **kwargs):
        hyper = {"scale": float(scale), "margin": float(margin)}
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper=hyper, **kwargs)


@keras.saving.register_keras_serializable(package="detreg_keras")
class ArcFaceLoss(ProxyLoss):
    """Keras wrapper of :func:`arcface_loss` (registry name ``"arcface"``).

    Owns a ``[C, D]`` class weight matrix named ``proxies``, ``N(0, 1)`` init (PML).

    Args:
        num_classes: number of training classes ``C``.
        embedding_dim: embedding dimension ``D``.
        scale: ``s`` (default 64).
        margin: ``m`` in radians (default 0.5).
        **kwargs: passed to :class:`DMLLoss`.
    """

    metric_name = "arcface_loss"
    loss_fn = staticmethod(arcface_loss)

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0, margin: float = 0.5, **kwargs):
        hyper = {"scale": float(scale), "margin": float(margin)}
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper=hyper, **kwargs)
