"""Triplet margin loss with batch-all, batch-hard and semi-hard mining.

With Euclidean distances ``d_ij`` between L2-normalised embeddings (FaceNet
constrains embeddings to the unit hypersphere) and margin ``m``, a triplet
``(a, p, n)`` (``y_p = y_a``, ``p != a``, ``y_n != y_a``) costs

    ℓ(a, p, n) = [d_ap - d_an + m]_+

and the mining strategy decides which triplets enter the loss:

* ``"all"`` (batch-all, Hermans et al. 2017): every valid triplet; the loss is
  the sum divided by the number of *non-zero* triplets (PML's
  ``AvgNonZeroReducer``).
* ``"hard"`` (batch-hard, Hermans et al. 2017): per anchor the farthest positive
  and the closest negative, ``[max_p d_ap - min_n d_an + m]_+``, averaged over
  the anchors that have a positive and a negative.
* ``"semihard"`` (FaceNet, Schroff et al. CVPR 2015, as in TensorFlow's
  ``triplet_semihard_loss``): per positive pair ``(a, p)`` the closest negative
  that is farther than the positive, ``n* = argmin {d_an : d_an > d_ap}``
  (a semi-hard negative when ``d_an < d_ap + m``); when no negative is farther,
  the farthest negative. Averaged over the positive pairs of anchors that have
  a negative.

Default ``margin = 0.2`` (FaceNet; also Roth et al. 2020) on non-squared
distances.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from detreg_keras.losses import _pairs
from detreg_keras.losses.base import DMLLoss

MINING_STRATEGIES = ("all", "hard", "semihard")


def check_mining(mining: str) -> str:
    """``mining`` when it is one of :data:`MINING_STRATEGIES`.

    Raises:
        ValueError: any other value (the message lists the strategies).
    """
    if mining not in MINING_STRATEGIES:
        raise ValueError(f"mining must be one of {MINING_STRATEGIES}, got {mining!r}.")
    return str(mining)


def triplet_hyper(margin: float, mining: str, squared: bool) -> dict:
    """The checked, typed ``margin`` / ``mining`` / ``squared`` hyper-parameters of a triplet-loss layer."""
    return {"margin": float(margin), "mining": check_mining(mining), "squared": bool(squared)}


def triplet_loss_from_masks(
    dist: tf.Tensor,
    pos_mask: tf.Tensor,
    neg_mask: tf.Tensor,
    margin: float = 0.2,
    mining: str = "all",
    triplet_penalty: tf.Tensor | None = None,
) -> tf.Tensor:
    """Triplet margin loss from a distance matrix and anchor-wise candidate masks.

    The building block shared by :func:`triplet_margin_loss`, the ρ-regularised
    variant (:mod:`detreg_keras.losses.rho`), which swaps the masks of some
    anchors, and direction regularisation (:mod:`detreg_keras.losses.direction`),
    which adds a per-triplet penalty.

    Args:
        dist: ``[B, B]`` distances ``d_ij``.
        pos_mask: ``[B, B]`` boolean, ``pos_mask[a, p]``: ``p`` may act as ``a``'s positive.
        neg_mask: ``[B, B]`` boolean, ``neg_mask[a, n]``: ``n`` may act as ``a``'s negative.
        margin: ``m``.
        mining: ``"all"``, ``"hard"`` or ``"semihard"``.
        triplet_penalty: optional ``[B, B, B]`` term ``t[a, p, n]`` added to each
            *mined* triplet whose hinge is active (``> 0``); the reductions (and
            the non-zero count of batch-all) are unchanged. Mined ties resolve to
            the first index.

    Returns:
        Scalar loss (0 when no valid triplet exists).
    """
    check_mining(mining)
    pos_mask = tf.cast(pos_mask, tf.bool)
    neg_mask = tf.cast(neg_mask, tf.bool)
    if mining == "all":
        valid = tf.logical_and(pos_mask[:, :, None], neg_mask[:, None, :])  # [a, p, n]
        losses = tf.nn.relu(dist[:, :, None] - dist[:, None, :] + margin)
        if triplet_penalty is not None:
            losses = losses + tf.where(losses > 0, triplet_penalty, tf.zeros_like(losses))
        return _pairs.mean_over_nonzero(losses, valid)
    has_neg = tf.reduce_any(neg_mask, axis=1)  # [B]
    if mining == "hard":
        hardest_pos = _pairs.masked_max(dist, pos_mask, axis=1)
        hardest_neg = _pairs.masked_min(dist, neg_mask, axis=1)
        valid = tf.logical_and(tf.reduce_any(pos_mask, axis=1), has_neg)
        losses = tf.nn.relu(hardest_pos - hardest_neg + margin)
        if triplet_penalty is not None:
            p_idx = tf.argmax(tf.where(pos_mask, dist, tf.fill(tf.shape(dist), dist.dtype.min)), axis=1)
            n_idx = tf.argmin(tf.where(neg_mask, dist, tf.fill(tf.shape(dist), dist.dtype.max)), axis=1)
            anchors = tf.range(tf.shape(dist)[0], dtype=tf.int64)
            chosen_penalty = tf.gather_nd(triplet_penalty, tf.stack([anchors, p_idx, n_idx], axis=1))
            losses = losses + tf.where(losses > 0, chosen_penalty, tf.zeros_like(losses))
        return _pairs.masked_mean(losses, valid)
    # semihard: for each (a, p), the closest negative with d_an > d_ap, else the farthest negative.
    farther = tf.logical_and(neg_mask[:, None, :], dist[:, None, :] > dist[:, :, None])  # [a, p, n]
    closest_farther = _pairs.masked_min(tf.broadcast_to(dist[:, None, :], tf.shape(farther)), farther, axis=2)
    farthest = _pairs.masked_max(dist, neg_mask, axis=1)  # [a]
    has_farther = tf.reduce_any(farther, axis=2)
    chosen = tf.where(has_farther, closest_farther, tf.broadcast_to(farthest[:, None], tf.shape(dist)))
    valid = tf.logical_and(pos_mask, has_neg[:, None])
    losses = tf.nn.relu(dist - chosen + margin)
    if triplet_penalty is not None:
        big = tf.fill(tf.shape(farther), dist.dtype.max)
        neg_dist = tf.broadcast_to(dist[:, None, :], tf.shape(farther))
        idx_farther = tf.argmin(tf.where(farther, neg_dist, big), axis=2)  # [a, p]
        idx_farthest = tf.argmax(tf.where(neg_mask, dist, tf.fill(tf.shape(dist), dist.dtype.min)), axis=1)  # [a]
        n_idx = tf.where(has_farther, idx_farther, tf.broadcast_to(idx_farthest[:, None], tf.shape(idx_farther)))
        chosen_penalty = tf.gather(triplet_penalty, n_idx, axis=2, batch_dims=2)  # t[a, p, n_ap]
        losses = losses + tf.where(losses > 0, chosen_penalty, tf.zeros_like(losses))
    return _pairs.masked_mean(losses, valid)


def triplet_margin_loss(
    embeddings: tf.Tensor,
    labels: tf.Tensor,
    margin: float = 0.2,
    mining: str = "all",
    squared: bool = False,
    triplet_penalty: tf.Tensor | None = None,
) -> tf.Tensor:
    """Triplet margin loss of a batch (see the module docstring).

    Args:
        embeddings: ``[B, D]`` embeddings (normalised inside).
        labels: ``[B]`` integer labels.
        margin: ``m`` (FaceNet: 0.2).
        mining: ``"all"`` (batch-all), ``"hard"`` (batch-hard) or ``"semihard"`` (FaceNet).
        squared: use squared distances (FaceNet's formulation) instead of distances.
        triplet_penalty: optional ``[B, B, B]`` term added to the active mined triplets,
            as in :func:`triplet_loss_from_masks` (direction regularisation passes one).

    Returns:
        Scalar loss (0 when the batch holds no valid triplet).

    Note:
        Batch-all materialises a ``[B, B, B]`` tensor (67 MB at ``B = 256``).
    """
    labels = _pairs.flat_labels(labels)
    dist = _pairs.pairwise_distance(embeddings, squared=squared)
    return triplet_loss_from_masks(
        dist,
        _pairs.positive_mask(labels),
        _pairs.negative_mask(labels),
        margin=margin,
        mining=mining,
        triplet_penalty=triplet_penalty,
    )


@keras.saving.register_keras_serializable(package="detreg_keras")
class TripletMarginLoss(DMLLoss):
    """Keras wrapper of :func:`triplet_margin_loss` (registry name ``"triplet"``).

    Args:
        num_classes: unused (pair-based), kept for the common interface.
        embedding_dim: unused (pair-based), kept for the common interface.
        margin: ``m`` (default 0.2, FaceNet).
        mining: ``"all"`` (default), ``"hard"`` or ``"semihard"``.
        squared: squared Euclidean distances (default False).
        **kwargs: passed to :class:`DMLLoss`.
    """

    metric_name = "triplet_loss"
    loss_fn = staticmethod(triplet_margin_loss)

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        margin: float = 0.2,
        mining: str = "all",
        squared: bool = False,
        **kwargs,
    ):
        hyper = triplet_hyper(margin, mining, squared)
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper=hyper, **kwargs)
