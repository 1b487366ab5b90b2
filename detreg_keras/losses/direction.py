"""Direction regularisation of the triplet loss (after Mohan et al., CVPR 2020).

The triplet loss pushes a negative ``n`` away from the anchor ``a`` alone. Mohan
et al. argue that the negative should instead move away from the *pair*
``(a, p)``, i.e. along a direction orthogonal to the anchor–positive line, so
that it is pushed away from both. With L2-normalised embeddings, the pair's
centre ``c = (x̂_a + x̂_p) / 2`` and θ_apn the angle between the push direction
``x̂_n - c`` and the anchor–positive direction ``x̂_p - x̂_a``:

    cos θ_apn = <x̂_n - c, x̂_p - x̂_a> / (||x̂_n - c|| ||x̂_p - x̂_a||)
    ℓ(a, p, n) = [d_ap - d_an + m]_+ + γ |cos θ_apn| · 1[d_ap - d_an + m > 0]

On the unit sphere the numerator is ``x̂_nᵀx̂_p - x̂_nᵀx̂_a``, so the penalty is 0
exactly when ``n`` is as far from ``p`` as from ``a``. The penalty enters only
the triplets that the mining keeps and whose hinge is active (a triplet with a
zero hinge exerts no push), and the triplet loss's reduction is unchanged
(:func:`detreg_keras.losses.triplet.triplet_loss_from_masks`). A triplet with
``x̂_p = x̂_a`` or ``x̂_n = c`` has no direction and gets no penalty.

Scope and caveats: written from the paper's description (the push direction of
the negative regularised towards orthogonality to the anchor–positive
direction); we had no access to the paper's equations while implementing, so
the exact form of the penalty (``|cos θ|`` added to active triplets, weight γ)
may differ from the paper's, which also shows the regulariser on ProxyNCA and
Multi-Similarity. The contrastive loss has no anchor–positive–negative triplet,
so there is no push direction to regularise and no contrastive variant here.
Default γ = 0.1 is ours, not the paper's.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from detreg_keras.losses import _pairs
from detreg_keras.losses.base import DMLLoss
from detreg_keras.losses.triplet import triplet_hyper, triplet_margin_loss


def direction_cosines(embeddings: tf.Tensor) -> tf.Tensor:
    """``[B, B, B]`` ``cos θ[a, p, n]`` of ``x̂_n - (x̂_a + x̂_p)/2`` and ``x̂_p - x̂_a`` (0 where undefined)."""
    x = _pairs.l2_normalize(embeddings)
    gram = tf.matmul(x, x, transpose_b=True)
    sq = tf.linalg.diag_part(gram)
    # <x_n - c, x_p - x_a> = <x_n, x_p> - <x_n, x_a> - (|x_p|^2 - |x_a|^2) / 2
    numerator = gram[None, :, :] - gram[:, None, :] - 0.5 * (sq[None, :, None] - sq[:, None, None])
    ap_sq = sq[:, None] + sq[None, :] - 2.0 * gram  # |x_p - x_a|^2, [a, p]
    nc_sq = (  # |x_n - c|^2 = |x_n|^2 - <x_n, x_a + x_p> + |x_a + x_p|^2 / 4
        sq[None, None, :]
        - gram[:, None, :]
        - gram[None, :, :]
        + 0.25 * (sq[:, None] + sq[None, :] + 2.0 * gram)[:, :, None]
    )
    denom = _pairs.safe_sqrt(tf.maximum(ap_sq, 0.0))[:, :, None] * _pairs.safe_sqrt(tf.maximum(nc_sq, 0.0))
    return tf.math.divide_no_nan(numerator, denom)


def direction_regularized_triplet_loss(
    embeddings: tf.Tensor,
    labels: tf.Tensor,
    margin: float = 0.2,
    gamma: float = 0.1,
    mining: str = "all",
    squared: bool = False,
) -> tf.Tensor:
    """Triplet margin loss with direction regularisation (see the module docstring).

    Args:
        embeddings: ``[B, D]`` embeddings (normalised inside).
        labels: ``[B]`` integer labels.
        margin: ``m`` (0.2).
        gamma: γ, weight of ``|cos θ|`` (0.1; 0 gives the plain triplet loss).
        mining: ``"all"``, ``"hard"`` or ``"semihard"`` (as :func:`triplet_margin_loss`).
        squared: squared Euclidean distances in the hinge.

    Returns:
        Scalar loss (0 when the batch holds no valid triplet).

    Note:
        Materialises ``[B, B, B]`` tensors for every mining (67 MB each at ``B = 256``).
    """
    penalty = gamma * tf.abs(direction_cosines(embeddings)) if gamma else None
    return triplet_margin_loss(embeddings, labels, margin, mining, squared, triplet_penalty=penalty)


@keras.saving.register_keras_serializable(package="detreg_keras")
class DirectionRegularizedTripletLoss(DMLLoss):
    """Keras wrapper of :func:`direction_regularized_triplet_loss` (registry name ``"triplet_dr"``).

    Args:
        num_classes: unused (pair-based), kept for the common interface.
        embedding_dim: unused (pair-based), kept for the common interface.
        margin: ``m`` (0.2).
        gamma: γ (0.1).
        mining: ``"all"`` (default), ``"hard"`` or ``"semihard"``.
        squared: squared Euclidean distances (default False).
        **kwargs: passed to :class:`DMLLoss`.
    """

    metric_name = "triplet_dr_loss"
    loss_fn = staticmethod(direction_regularized_triplet_loss)

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        margin: float = 0.2,
        gamma: float = 0.1,
        mining: str = "all",
        squared: bool = False,
        **kwargs,
    ):
        if float(gamma) < 0:
            raise ValueError(f"gamma (direction-regulariser weight) must be >= 0, got {gamma!r}.")
        hyper = {**triplet_hyper(margin, mining, squared), "gamma": float(gamma)}
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper=hyper, **kwargs)
