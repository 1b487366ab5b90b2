"""Contrastive loss (Hadsell, Chopra & LeCun, CVPR 2006), pytorch-metric-learning form.

With Euclidean distances ``d_ij = ||x̂_i - x̂_j||`` between L2-normalised
embeddings, positive pairs ``P`` (same label, ``i != j``) and negative pairs
``N`` (different labels), over ordered pairs:

    ℓ⁺_ij = [d_ij - m⁺]_+^p          (i, j) ∈ P
    ℓ⁻_ij = [m⁻ - d_ij]_+^p          (i, j) ∈ N
    L = Σ_P ℓ⁺ / |{ℓ⁺ > 0}| + Σ_N ℓ⁻ / |{ℓ⁻ > 0}|

Each term is averaged over its *non-zero* pairs (PML's ``AvgNonZeroReducer``)
and is 0 when no pair is active. Defaults are pytorch-metric-learning's
``ContrastiveLoss``: ``pos_margin = 0``, ``neg_margin = 1`` on non-squared
distances, ``power = 1``; Hadsell et al.'s original squared form is ``power=2``.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from detreg_keras.losses import _pairs
from detreg_keras.losses.base import DMLLoss


def contrastive_loss_from_masks(
    dist: tf.Tensor,
    pos_mask: tf.Tensor,
    neg_mask: tf.Tensor,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    power: float = 1.0,
) -> tf.Tensor:
    """Contrastive loss from a distance matrix and its positive / negative pair masks.

    The building block shared by :func:`contrastive_loss` (the batch against
    itself) and cross-batch memory (:mod:`detreg_keras.losses.xbm`, the batch
    against batch and memory).

    Args:
        dist: ``[Q, K]`` distances ``d_ij``.
        pos_mask: ``[Q, K]`` boolean, the positive pairs ``P``.
        neg_mask: ``[Q, K]`` boolean, the negative pairs ``N``.
        pos_margin: ``m⁺``.
        neg_margin: ``m⁻``.
        power: hinge exponent ``p``.

    Returns:
        Scalar loss; 0 without any active pair.
    """
    pos_loss = tf.nn.relu(dist - pos_margin)
    neg_loss = tf.nn.relu(neg_margin - dist)
    if power != 1.0:
        pos_loss = tf.pow(pos_loss, power)
        neg_loss = tf.pow(neg_loss, power)
    return _pairs.mean_over_nonzero(pos_loss, pos_mask) + _pairs.mean_over_nonzero(neg_loss, neg_mask)


def contrastive_loss(
    embeddings: tf.Tensor,
    labels: tf.Tensor,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    power: float = 1.0,
) -> tf.Tensor:
    """Contrastive loss of a batch (see the module docstring for the formula).

    Args:
        embeddings: ``[B, D]`` embeddings (normalised inside).
        labels: ``[B]`` integer labels.
        pos_margin: ``m⁺``, distance under which positive pairs cost nothing (PML: 0).
        neg_margin: ``m⁻``, distance over which negative pairs cost nothing (PML: 1).
        power: exponent ``p`` of each pair's hinge (PML: 1; Hadsell et al.: 2).

    Returns:
        Scalar loss; 0 for a batch without any active pair.
    """
    labels = _pairs.flat_labels(labels)
    return contrastive_loss_from_masks(
        _pairs.pairwise_distance(embeddings),
        _pairs.positive_mask(labels),
        _pairs.negative_mask(labels),
        pos_margin=pos_margin,
        neg_margin=neg_margin,
        power=power,
    )


@keras.saving.register_keras_serializable(package="detreg_keras")
class ContrastiveLoss(DMLLoss):
    """Keras wrapper of :func:`contrastive_loss` (registry name ``"contrastive"``).

    Args:
        num_classes: unused (pair-based), kept for the common interface.
        embedding_dim: unused (pair-based), kept for the common interface.
        pos_margin: ``m⁺`` (default 0, PML).
        neg_margin: ``m⁻`` on Euclidean distances of unit vectors (default 1, PML).
        power: hinge exponent (default 1, PML).
        **kwargs: passed to :class:`DMLLoss`.
    """

    metric_name = "contrastive_loss"
    loss_fn = staticmethod(contrastive_loss)

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        pos_margin: float = 0.0,
        neg_margin: float = 1.0,
        power: float = 1.0,
        **kwargs,
    ):
        hyper = {"pos_margin": float(pos_margin), "neg_margin": float(neg_margin), "power": float(power)}
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper=hyper, **kwargs)
