"""Lifted structured loss, smooth version (Oh Song et al., CVPR 2016).

With Euclidean distances ``D_ij`` between L2-normalised embeddings, margin α,
the positive pairs ``P`` and, for each sample ``i``, its negatives ``N_i``:

    J_ij = log( Σ_{k ∈ N_i} exp(α - D_ik) + Σ_{l ∈ N_j} exp(α - D_jl) ) + D_ij
    L    = 1 / (2|P|) Σ_{(i,j) ∈ P} [J_ij]_+²

``J_ij`` is computed as a (masked) logsumexp, never as ``log(Σ exp)``. Default
``margin = 1`` (the paper's α; pytorch-metric-learning's ``neg_margin``).
Pairs whose two samples have no negative in the batch are dropped.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from detreg_keras.losses import _pairs
from detreg_keras.losses.base import DMLLoss


def lifted_structure_loss(embeddings: tf.Tensor, labels: tf.Tensor, margin: float = 1.0) -> tf.Tensor:
    """Smooth lifted structured loss of a batch (see the module docstring).

    Args:
        embeddings: ``[B, D]`` embeddings (normalised inside).
        labels: ``[B]`` integer labels.
        margin: α (paper: 1.0).

    Returns:
        Scalar loss (0 when the batch has no positive pair or no negative).
    """
    labels = _pairs.flat_labels(labels)
    dist = _pairs.pairwise_distance(embeddings)
    pos = _pairs.positive_mask(labels)
    neg = _pairs.negative_mask(labels)
    neg_lse = _pairs.masked_logsumexp(margin - dist, neg, axis=1)  # [B]: log Σ_{k∈N_i} exp(α - D_ik)
    has_neg = tf.reduce_any(neg, axis=1)
    n = tf.shape(dist)[0]
    pair_lse = tf.stack([tf.broadcast_to(neg_lse[:, None], [n, n]), tf.broadcast_to(neg_lse[None, :], [n, n])], -1)
    pair_has = tf.stack([tf.broadcast_to(has_neg[:, None], [n, n]), tf.broadcast_to(has_neg[None, :], [n, n])], -1)
    j = _pairs.masked_logsumexp(pair_lse, pair_has, axis=-1) + dist  # [B, B]
    valid = tf.logical_and(pos, tf.reduce_any(pair_has, axis=-1))
    # Ordered pairs count each unordered pair twice: Σ_ord / (2 |P_ord|) = Σ_P / (2 |P|).
    return 0.5 * _pairs.masked_mean(tf.square(tf.nn.relu(j)), valid)


@keras.saving.register_keras_serializable(package="detreg_keras")
class LiftedStructureLoss(DMLLoss):
    """Keras wrapper of :func:`lifted_structure_loss` (registry name ``"lifted_structure"``).

    Args:
        num_classes: unused (pair-based), kept for the common interface.
        embedding_dim: unused (pair-based), kept for the common interface.
        margin: α (default 1.0, the paper's).
        **kwargs: passed to :class:`DMLLoss`.
    """

    metric_name = "lifted_structure_loss"
    loss_fn = staticmethod(lifted_structure_loss)

    def __init__(self, num_classes: int | None = None, embedding_dim: int | None = None, margin: float = 1.0, **kwargs):
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper={"margin": float(margin)}, **kwargs)
