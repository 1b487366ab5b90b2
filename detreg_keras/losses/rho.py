"""ρ-regularisation of ranking losses and the ρ spectrum metric (Roth et al., ICML 2020).

Roth, Milbich, Sinha, Gupta, Ommer & Cohen, "Revisiting Training Strategies and
Generalization Performance in Deep Metric Learning".

**ρ-regularisation**: with probability ``p_switch = ρ`` a training
triplet's negative is replaced by a sample of the anchor's own class, which
pushes same-class samples apart, keeps more directions of significant variance
and so flattens the singular value spectrum. Following the reference
implementation (``batchminer/rho_distance.py`` of
``Confusezius/Revisiting_Deep_Metric_Learning_PyTorch``), the switch is drawn
per anchor and a switched anchor ``a`` acts as its own positive, giving the
triplets ``(a, a, p*)`` with ``y_p* = y_a``, ``p* != a``:

    ℓ(a, a, p*) = [d_aa - d_ap* + m]_+ = [m - d_ap*]_+

Here the switch is applied to the candidate masks of
:func:`detreg_keras.losses.triplet.triplet_loss_from_masks`, so it combines with
batch-all, batch-hard and semi-hard mining. Anchors without a same-class
sample are never switched (they have no triplet either way).

**ρ spectrum** ("spectral decay"): with ``s_1 ≥ … ≥ s_D`` the singular
values of the embedding matrix ``Φ`` (``[N, D]``, not centred, as in the
reference ``metrics/rho_spectrum.py``), ``S = s / Σ s`` and ``U`` uniform,

    ρ(Φ) = KL(U ‖ S) = Σ_d 1/D · log((1/D) / S_d)

Low ρ: many directions of significant variance; high ρ: compressed embeddings.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from detreg_keras.losses import _pairs
from detreg_keras.losses.base import DMLLoss
from detreg_keras.losses.triplet import MINING_STRATEGIES, triplet_loss_from_masks


def rho_switch_masks(
    pos_mask: tf.Tensor, neg_mask: tf.Tensor, switch: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Apply the ρ switch to anchor-wise candidate masks.

    For a switched anchor ``a`` the positives become ``{a}`` and the negatives its
    former positives (same class, ``!= a``); other anchors keep their masks.

    Args:
        pos_mask: ``[B, B]`` boolean positive candidates.
        neg_mask: ``[B, B]`` boolean negative candidates.
        switch: ``[B]`` boolean, the anchors to switch.

    Returns:
        ``(pos_mask, neg_mask)`` after the switch.
    """
    pos_mask = tf.cast(pos_mask, tf.bool)
    neg_mask = tf.cast(neg_mask, tf.bool)
    switch = tf.cast(tf.reshape(switch, [-1]), tf.bool)[:, None]
    eye = tf.eye(tf.shape(pos_mask)[0], dtype=tf.bool)
    return tf.where(switch, eye, pos_mask), tf.where(switch, pos_mask, neg_mask)


def rho_triplet_loss(
    embeddings: tf.Tensor,
    labels: tf.Tensor,
    rho: float = 0.2,
    margin: float = 0.2,
    mining: str = "all",
    squared: bool = False,
    seed: tf.Tensor | None = None,
    switch: tf.Tensor | None = None,
) -> tf.Tensor:
    """Triplet margin loss with ρ-regularisation (see the module docstring).

    Args:
        embeddings: ``[B, D]`` embeddings (normalised inside).
        labels: ``[B]`` integer labels.
        rho: ``p_switch``, the probability that an anchor's negatives are swapped
            for same-class samples (0.2; the paper tunes it per dataset).
        margin: triplet margin ``m`` (0.2).
        mining: ``"all"``, ``"hard"`` or ``"semihard"`` (see :mod:`.triplet`).
        squared: squared Euclidean distances.
        seed: stateless seed (int ``[2]``) of the switch draw; ``None`` uses the
            global generator.
        switch: optional ``[B]`` boolean that fixes the switched anchors instead of
            drawing them (then ``rho`` and ``seed`` are ignored).

    Returns:
        Scalar loss.
    """
    labels = _pairs.flat_labels(labels)
    dist = _pairs.pairwise_distance(embeddings, squared=squared)
    pos = _pairs.positive_mask(labels)
    neg = _pairs.negative_mask(labels)
    if switch is None:
        switch = _pairs.stateless_or_random_uniform(tf.shape(labels), seed) < rho
    switch = tf.logical_and(tf.cast(switch, tf.bool), tf.reduce_any(pos, axis=1))
    pos, neg = rho_switch_masks(pos, neg, switch)
    return triplet_loss_from_masks(dist, pos, neg, margin=margin, mining=mining)


def normalized_singular_spectrum(embeddings, skip: int = 0) -> np.ndarray:
    """Singular values of the (uncentred) embedding matrix, descending, without the
    ``skip`` largest, normalised to sum 1 (the reference metric's mode 0)."""
    s = np.linalg.svd(np.asarray(embeddings, dtype=np.float64), compute_uv=False)[int(skip):]
    if s.size == 0:
        raise ValueError(f"no singular value left after skipping {skip} of them.")
    total = s.sum()
    return s / total if total > 0 else np.full_like(s, 1.0 / s.size)


def rho_spectrum(embeddings, skip: int = 0, reverse: bool = False, eps: float = 1e-12) -> float:
    """ρ spectrum ``KL(U ‖ S)`` of an embedding matrix (see the module docstring).

    Args:
        embeddings: ``[N, D]`` array (numpy or an eager tensor).
        skip: drop the ``skip`` largest singular values first (the reference
            metric ``rho_spectrum@m`` uses ``skip = |m| - 1``).
        reverse: return ``KL(S ‖ U)`` instead (the reference's negative modes).
        eps: floor under ``S`` inside the log, so a rank-deficient matrix gives a
            large finite value rather than ``inf``.

    Returns:
        The divergence, a Python float (0 for a perfectly flat spectrum).
    """
    s_norm = normalized_singular_spectrum(embeddings, skip=skip)
    uniform = np.full_like(s_norm, 1.0 / s_norm.size)
    if reverse:
        nz = s_norm > 0
        return float(np.sum(s_norm[nz] * np.log(s_norm[nz] / uniform[nz])))
    return float(np.sum(uniform * (np.log(uniform) - np.log(np.maximum(s_norm, eps)))))


@keras.saving.register_keras_serializable(package="detreg_keras")
class RhoTripletLoss(DMLLoss):
    """Keras wrapper of :func:`rho_triplet_loss` (registry name ``"rho_triplet"``).

    Args:
        num_classes: unused (pair-based), kept for the common interface.
        embedding_dim: unused (pair-based), kept for the common interface.
        rho: ``p_switch`` (default 0.2).
        margin: triplet margin (default 0.2).
        mining: ``"all"`` (default), ``"hard"`` or ``"semihard"``.
        squared: squared distances (default False).
        seed: seed of the switch draws (a ``keras.random.SeedGenerator``).
        **kwargs: passed to :class:`DMLLoss`.
    """

    metric_name = "rho_triplet_loss"
    loss_fn = staticmethod(rho_triplet_loss)

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        rho: float = 0.2,
        margin: float = 0.2,
        mining: str = "all",
        squared: bool = False,
        seed: int | None = None,
        **kwargs,
    ):
        if mining not in MINING_STRATEGIES:
            raise ValueError(f"mining must be one of {MINING_STRATEGIES}, got {mining!r}.")
        if not 0.0 <= float(rho) <= 1.0:
            raise ValueError(f"rho must lie in [0, 1], got {rho!r}.")
        hyper = {"rho": float(rho), "margin": float(margin), "mining": str(mining), "squared": bool(squared), "seed": seed}
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper=hyper, **kwargs)
