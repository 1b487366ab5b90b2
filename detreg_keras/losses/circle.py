"""Circle loss, pair-wise labels form (Sun et al., CVPR 2020).

For each anchor with cosine similarities ``s_p`` to its positives and ``s_n``
to its negatives (L2-normalised embeddings), relaxation ``m`` and scale γ:

    O_p = 1 + m,  O_n = -m,  Δ_p = 1 - m,  Δ_n = m
    α_p = [O_p - s_p]_+,  α_n = [s_n - O_n]_+          (treated as constants)
    L_anchor = log(1 + Σ_n Σ_p exp(γ (α_n (s_n - Δ_n) - α_p (s_p - Δ_p))))
             = softplus(logsumexp_n(γ α_n (s_n - Δ_n)) + logsumexp_p(-γ α_p (s_p - Δ_p)))

averaged over the anchors that have at least one positive and one negative
(per-anchor form of pytorch-metric-learning's ``CircleLoss``). Defaults
``m = 0.4``, ``γ = 80``: the paper's fine-grained image retrieval setting and
PML's default (the paper uses ``m = 0.25``, ``γ = 256`` for face recognition
and re-identification).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from detreg_keras.losses import _pairs
from detreg_keras.losses.base import DMLLoss


def circle_loss_from_masks(
    sim: tf.Tensor, pos_mask: tf.Tensor, neg_mask: tf.Tensor, margin: float = 0.4, gamma: float = 80.0
) -> tf.Tensor:
    """Circle loss from a similarity matrix and its positive / negative pair masks.

    The building block shared by :func:`circle_loss` (the batch against itself)
    and cross-batch memory (:mod:`detreg_keras.losses.xbm`, the batch against
    batch and memory); row ``i`` is anchor ``i``.

    Args:
        sim: ``[Q, K]`` cosine similarities.
        pos_mask: ``[Q, K]`` boolean, the positive pairs.
        neg_mask: ``[Q, K]`` boolean, the negative pairs.
        margin: relaxation ``m``.
        gamma: scale γ.

    Returns:
        Scalar loss averaged over the anchors with a positive and a negative (0 when none has).
    """
    plain = tf.stop_gradient(sim)
    alpha_p = tf.nn.relu(1.0 + margin - plain)
    alpha_n = tf.nn.relu(plain + margin)
    logit_p = -gamma * alpha_p * (sim - (1.0 - margin))
    logit_n = gamma * alpha_n * (sim - margin)
    lse_p = _pairs.masked_logsumexp(logit_p, pos_mask, axis=1)
    lse_n = _pairs.masked_logsumexp(logit_n, neg_mask, axis=1)
    valid = tf.logical_and(tf.reduce_any(pos_mask, axis=1), tf.reduce_any(neg_mask, axis=1))
    return _pairs.masked_mean(tf.nn.softplus(lse_p + lse_n), valid)


def circle_loss(embeddings: tf.Tensor, labels: tf.Tensor, margin: float = 0.4, gamma: float = 80.0) -> tf.Tensor:
    """Circle loss of a batch (see the module docstring).

    Args:
        embeddings: ``[B, D]`` embeddings (normalised inside).
        labels: ``[B]`` integer labels.
        margin: relaxation ``m`` (0.4; 0.25 for face recognition).
        gamma: scale γ (80; 256 for face recognition).

    Returns:
        Scalar loss (0 when no anchor has both a positive and a negative).
    """
    labels = _pairs.flat_labels(labels)
    return circle_loss_from_masks(
        _pairs.cosine_similarity_matrix(embeddings),
        _pairs.positive_mask(labels),
        _pairs.negative_mask(labels),
        margin=margin,
        gamma=gamma,
    )


@keras.saving.register_keras_serializable(package="detreg_keras")
class CircleLoss(DMLLoss):
    """Keras wrapper of :func:`circle_loss` (registry name ``"circle"``).

    Args:
        num_classes: unused (pair-based), kept for the common interface.
        embedding_dim: unused (pair-based), kept for the common interface.
        margin: ``m`` (default 0.4).
        gamma: γ (default 80).
        **kwargs: passed to :class:`DMLLoss`.
    """

    metric_name = "circle_loss"
    loss_fn = staticmethod(circle_loss)

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        margin: float = 0.4,
        gamma: float = 80.0,
        **kwargs,
    ):
        hyper = {"margin": float(margin), "gamma": float(gamma)}
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper=hyper, **kwargs)
