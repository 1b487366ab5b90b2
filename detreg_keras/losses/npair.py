"""Multi-class N-pair loss (Sohn, NeurIPS 2016).

The batch is reduced to N pairs ``(x_i, x_i⁺)`` from N distinct classes, as in
pytorch-metric-learning's ``NPairsLoss``: for every class with at least two
samples, its first occurrence is the anchor and its second the positive. With
``f_i`` the anchors, ``f_j⁺`` the positives and ``s`` a scale,

    L = 1/N Σ_i log(1 + Σ_{j≠i} exp(s f_iᵀf_j⁺ - s f_iᵀf_i⁺))
      = 1/N Σ_i CE(softmax_j(s f_iᵀf_j⁺), i)

Similarities are cosines (PML's default ``DotProductSimilarity`` normalises the
embeddings, and ``DRegModel`` feeds unit vectors, which makes Sohn's L2
penalty on the embedding norms a constant, so it is omitted). Classes with a
single sample contribute nothing; a batch with fewer than two pairs has loss 0.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from detreg_keras.losses import _pairs
from detreg_keras.losses.base import DMLLoss


def npair_anchor_positive_masks(labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The N-pair reduction of a batch: ``(anchor [B], positive [B])`` boolean masks.

    ``anchor[i]``: ``i`` is the first occurrence of a class that occurs at least
    twice; ``positive[j]``: ``j`` is the second occurrence of its class.
    """
    labels = _pairs.flat_labels(labels)
    same = _pairs.same_label_matrix(labels)
    idx = tf.range(tf.shape(labels)[0])
    earlier = tf.logical_and(same, idx[None, :] < idx[:, None])  # [i, j]: j before i, same class
    rank_in_class = tf.reduce_sum(tf.cast(earlier, tf.int32), axis=1)
    positive = tf.equal(rank_in_class, 1)
    first = tf.equal(rank_in_class, 0)
    anchor = tf.logical_and(first, tf.reduce_any(tf.logical_and(same, positive[None, :]), axis=1))
    return anchor, positive


def npair_loss(embeddings: tf.Tensor, labels: tf.Tensor, scale: float = 1.0) -> tf.Tensor:
    """Multi-class N-pair loss of a batch (see the module docstring).

    Args:
        embeddings: ``[B, D]`` embeddings (normalised inside).
        labels: ``[B]`` integer labels.
        scale: ``s`` multiplying the cosine logits (PML / Sohn: 1).

    Returns:
        Scalar loss averaged over the anchors (0 when the batch has no pair).
    """
    labels = _pairs.flat_labels(labels)
    anchor, positive = npair_anchor_positive_masks(labels)
    logits = scale * _pairs.cosine_similarity_matrix(embeddings)  # [anchor i, positive j]
    same = _pairs.same_label_matrix(labels)
    target = tf.logical_and(same, positive[None, :])  # the anchor's own positive
    target_logit = tf.reduce_sum(tf.where(target, logits, tf.zeros_like(logits)), axis=1)
    log_partition = _pairs.masked_logsumexp(logits, positive[None, :], axis=1)
    return _pairs.masked_mean(log_partition - target_logit, anchor)


@keras.saving.register_keras_serializable(package="detreg_keras")
class NPairLoss(DMLLoss):
    """Keras wrapper of :func:`npair_loss` (registry name ``"npair"``).

    Args:
        num_classes: unused (pair-based), kept for the common interface.
        embedding_dim: unused (pair-based), kept for the common interface.
        scale: logit scale ``s`` (default 1, as Sohn / PML).
        **kwargs: passed to :class:`DMLLoss`.
    """

    metric_name = "npair_loss"
    loss_fn = staticmethod(npair_loss)

    def __init__(self, num_classes: int | None = None, embedding_dim: int | None = None, scale: float = 1.0, **kwargs):
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper={"scale": float(scale)}, **kwargs)
