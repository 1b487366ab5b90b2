"""Multi-similarity loss with its pair mining (Wang et al., CVPR 2019).

With cosine similarities ``S_ik`` of L2-normalised embeddings, each anchor
``i`` mines its informative pairs (margin ε):

    N̂_i = {k ∈ N_i : S_ik + ε > min_{j ∈ P_i} S_ij}
    P̂_i = {j ∈ P_i : S_ij - ε < max_{k ∈ N_i} S_ik}

and the loss is

    L = 1/B Σ_i [ 1/α log(1 + Σ_{j ∈ P̂_i} exp(-α (S_ij - λ)))
                + 1/β log(1 + Σ_{k ∈ N̂_i} exp( β (S_ik - λ))) ]

Anchors with an empty ``P̂_i`` or ``N̂_i`` are skipped but still counted in
``B``, as in the official implementation (``losses/multi_similarity_loss.py``
of MalongTech/research-ms-loss). Defaults α = 2, β = 50, λ = 0.5, ε = 0.1
(the official code and pytorch-metric-learning's ``MultiSimilarityLoss`` /
``MultiSimilarityMiner``). ``epsilon=None`` disables the mining (all pairs).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from detreg_keras.losses import _pairs
from detreg_keras.losses.base import DMLLoss


def multi_similarity_loss_from_masks(
    sim: tf.Tensor,
    pos_mask: tf.Tensor,
    neg_mask: tf.Tensor,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float | None = 0.1,
) -> tf.Tensor:
    """Multi-similarity loss with MS pair mining from a similarity matrix and its pair masks.

    The building block shared by :func:`multi_similarity_loss` (the batch
    against itself) and cross-batch memory (:mod:`detreg_keras.losses.xbm`,
    the batch against batch and memory): row ``i`` is anchor ``i``, the mining
    compares it with its hardest pair of the other kind among the columns.

    Args:
        sim: ``[Q, K]`` cosine similarities ``S_ik``.
        pos_mask: ``[Q, K]`` boolean, the positive pairs ``P_i``.
        neg_mask: ``[Q, K]`` boolean, the negative pairs ``N_i``.
        alpha: α.
        beta: β.
        base: λ.
        epsilon: ε of the pair mining; ``None`` keeps all pairs.

    Returns:
        Scalar loss, the sum over the anchors with mined pairs divided by ``Q``.
    """
    pos, neg = pos_mask, neg_mask
    if epsilon is not None:
        plain = tf.stop_gradient(sim)
        min_pos = tf.reduce_min(tf.where(pos, plain, tf.fill(tf.shape(plain), plain.dtype.max)), axis=1)
        max_neg = tf.reduce_max(tf.where(neg, plain, tf.fill(tf.shape(plain), plain.dtype.min)), axis=1)
        neg = tf.logical_and(neg, plain + epsilon > min_pos[:, None])
        pos = tf.logical_and(pos, plain - epsilon < max_neg[:, None])
    pos_term = _pairs.masked_logsumexp(-alpha * (sim - base), pos, axis=1, add_one=True) / alpha
    neg_term = _pairs.masked_logsumexp(beta * (sim - base), neg, axis=1, add_one=True) / beta
    valid = tf.logical_and(tf.reduce_any(pos, axis=1), tf.reduce_any(neg, axis=1))
    per_anchor = tf.where(valid, pos_term + neg_term, tf.zeros_like(pos_term))
    return tf.reduce_sum(per_anchor) / tf.cast(tf.shape(sim)[0], tf.float32)


def multi_similarity_loss(
    embeddings: tf.Tensor,
    labels: tf.Tensor,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float | None = 0.1,
) -> tf.Tensor:
    """Multi-similarity loss of a batch with MS pair mining (see the module docstring).

    Args:
        embeddings: ``[B, D]`` embeddings (normalised inside).
        labels: ``[B]`` integer labels.
        alpha: α, positive scale (2).
        beta: β, negative scale (50).
        base: λ, the similarity margin (0.5).
        epsilon: ε of the pair mining (0.1); ``None`` keeps all pairs.

    Returns:
        Scalar loss, the sum over the anchors with mined pairs divided by ``B``.
    """
    labels = _pairs.flat_labels(labels)
    return multi_similarity_loss_from_masks(
        _pairs.cosine_similarity_matrix(embeddings),
        _pairs.positive_mask(labels),
        _pairs.negative_mask(labels),
        alpha=alpha,
        beta=beta,
        base=base,
        epsilon=epsilon,
    )


@keras.saving.register_keras_serializable(package="detreg_keras")
class MultiSimilarityLoss(DMLLoss):
    """Keras wrapper of :func:`multi_similarity_loss` (registry name ``"multi_similarity"``).

    Args:
        num_classes: unused (pair-based), kept for the common interface.
        embedding_dim: unused (pair-based), kept for the common interface.
        alpha: α (default 2).
        beta: β (default 50).
        base: λ (default 0.5).
        epsilon: mining margin ε (default 0.1; ``None`` disables mining).
        **kwargs: passed to :class:`DMLLoss`.
    """

    metric_name = "ms_loss"
    loss_fn = staticmethod(multi_similarity_loss)

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        epsilon: float | None = 0.1,
        **kwargs,
    ):
        hyper = {
            "alpha": float(alpha),
            "beta": float(beta),
            "base": float(base),
            "epsilon": None if epsilon is None else float(epsilon),
        }
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper=hyper, **kwargs)
