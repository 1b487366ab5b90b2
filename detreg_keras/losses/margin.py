"""Margin loss with distance-weighted sampling (Wu, Manmatha, Smola & Krähenbühl, ICCV 2017).

*Sampling.* On the unit sphere of ``R^n`` (``n`` = embedding dimension) the
pairwise distance of uniformly spread points has density

    q(d) = d^{n-2} (1 - d²/4)^{(n-3)/2} / Z,     Z = 2^{n-2} B((n-1)/2, (n-1)/2)

(``Z`` normalises it on ``[0, 2]``). For each anchor ``a`` and each of its
positives ``p`` one negative is drawn with

    Pr(n | a) ∝ min(λ, q(max(D_an, cutoff))^{-1}) · 1[D_an < nonzero_loss_cutoff]

over the negatives of ``a``. ``cutoff = 0.5`` (the paper's clipping, which the
official MXNet code implements as a lower bound on the distance) and
``nonzero_loss_cutoff = 1.4`` (official code: negatives that far give a zero
loss for β = 1.2, α = 0.2, so they are not drawn) are the defaults; the
explicit cap ``λ`` (``weight_cap``, on the *normalised* ``q^{-1}``) is off by
default, as in the official code. An anchor whose negatives all lie beyond
``nonzero_loss_cutoff`` draws uniformly among its negatives (the official code
falls back to uniform over the whole batch, positives included); an anchor
without negatives contributes nothing. The draw is inverse-CDF sampling with
uniforms ``u_ap`` (stateless when seeded), so it is reproducible.

*Loss.* With ``y = +1`` for the positive pair ``(a, p)`` and ``-1`` for the
sampled ``(a, n)``, ``β_a`` the learnable boundary (per class of the anchor,
``β_{y_a}``, or one global β) and margin ``α``:

    ℓ⁺_ap = [α + D_ap - β_a]_+,   ℓ⁻_an = [α - (D_an - β_a)]_+
    L = (Σ ℓ⁺ + Σ ℓ⁻ + ν Σ_(a,p) β_a) / #{ℓ > 0}

normalised by the number of active pairs (the official ``MarginLoss``), 0 when
none is active. Defaults α = 0.2, β₀ = 1.2, ν = 0 (official code). Distances are
Euclidean between L2-normalised embeddings; the sampling sends no gradient.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from detreg_keras.losses import _pairs
from detreg_keras.losses.base import DMLLoss

BETA_MODES = ("class", "global")


def _static_dim(embeddings: tf.Tensor) -> int:
    dim = embeddings.shape[-1]
    if dim is None:
        raise ValueError("distance-weighted sampling needs a static embedding dimension (q(d) depends on it).")
    if int(dim) < 2:
        raise ValueError(f"distance-weighted sampling needs an embedding dimension >= 2, got {dim}.")
    return int(dim)


def log_inverse_sphere_density(dist: tf.Tensor, dim: int) -> tf.Tensor:
    """``log q(d)^{-1}`` of the normalised distance density on the unit sphere of ``R^dim``."""
    log_z = (dim - 2) * math.log(2.0) + 2.0 * math.lgamma((dim - 1) / 2.0) - math.lgamma(dim - 1.0)
    one_minus = tf.maximum(1.0 - 0.25 * tf.square(dist), 1e-8)
    return -((dim - 2.0) * tf.math.log(dist) + 0.5 * (dim - 3.0) * tf.math.log(one_minus)) + log_z


def distance_weighted_probabilities(
    embeddings: tf.Tensor,
    labels: tf.Tensor,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
    weight_cap: float | None = None,
) -> tf.Tensor:
    """``[B, B]`` sampling probabilities ``Pr(n | a)`` of distance-weighted sampling (rows sum to 1 or 0).

    Args:
        embeddings: ``[B, n]`` embeddings (normalised inside); ``n`` must be static.
        labels: ``[B]`` integer labels.
        cutoff: lower clip of the distances (0.5).
        nonzero_loss_cutoff: negatives at least this far get probability 0 (1.4).
        weight_cap: λ, the cap on the normalised ``q^{-1}``; ``None``: no cap.

    Returns:
        Row ``a``: a distribution over ``a``'s negatives (uniform when all of them lie
        beyond ``nonzero_loss_cutoff``), all zeros when ``a`` has no negative.
    """
    dim = _static_dim(embeddings)
    labels = _pairs.flat_labels(labels)
    dist = tf.stop_gradient(_pairs.pairwise_distance(embeddings))
    clipped = tf.maximum(dist, cutoff)
    log_w = log_inverse_sphere_density(clipped, dim)
    if weight_cap is not None:
        log_w = tf.minimum(log_w, math.log(weight_cap))
    negatives = _pairs.negative_mask(labels)
    weighted = tf.logical_and(negatives, clipped < nonzero_loss_cutoff)
    has_weighted = tf.reduce_any(weighted, axis=1, keepdims=True)
    candidates = tf.where(has_weighted, weighted, negatives)
    log_w = tf.where(has_weighted, log_w, tf.zeros_like(log_w))  # uniform fallback
    row_max = _pairs.masked_max(log_w, candidates, axis=1)[:, None]
    w = tf.where(candidates, tf.exp(tf.where(candidates, log_w - row_max, tf.zeros_like(log_w))), 0.0)
    return tf.math.divide_no_nan(w, tf.reduce_sum(w, axis=1, keepdims=True))


def sample_negatives(probabilities: tf.Tensor, uniforms: tf.Tensor) -> tf.Tensor:
    """Inverse-CDF draw: ``n[a, p]`` = first ``n`` with ``cumsum_n Pr(· | a) > u[a, p] · total_a``.

    Args:
        probabilities: ``[B, B]`` rows of :func:`distance_weighted_probabilities`.
        uniforms: ``[B, B]`` uniforms in ``[0, 1)``, one per (anchor, positive slot).

    Returns:
        ``[B, B]`` int32 negative indices (0 on rows without candidates; callers mask them).
    """
    cdf = tf.cumsum(probabilities, axis=1)
    threshold = uniforms * cdf[:, -1:]
    above = cdf[:, None, :] > threshold[:, :, None]  # [a, p, n]
    return tf.cast(tf.argmax(tf.cast(above, tf.int32), axis=2), tf.int32)


def margin_loss(
    embeddings: tf.Tensor,
    labels: tf.Tensor,
    beta: tf.Tensor,
    alpha: float = 0.2,
    nu: float = 0.0,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
    weight_cap: float | None = None,
    seed: tf.Tensor | None = None,
    uniforms: tf.Tensor | None = None,
) -> tf.Tensor:
    """Margin loss of a batch with distance-weighted negatives (see the module docstring).

    Args:
        embeddings: ``[B, n]`` embeddings (normalised inside); ``n`` must be static.
        labels: ``[B]`` integer labels (in ``[0, C)`` for a per-class β).
        beta: β, a scalar / ``[1]`` (global) or ``[C]`` (per class, indexed by the anchor's label).
        alpha: α, the margin (0.2).
        nu: ν, the weight of the β regulariser ``ν Σ β_a`` (0).
        cutoff: lower clip of the sampling distances (0.5).
        nonzero_loss_cutoff: negatives at least this far are not drawn (1.4).
        weight_cap: λ cap on ``q^{-1}`` (``None``: off).
        seed: stateless seed (int ``[2]``) of the draw; ``None`` uses the global generator.
        uniforms: ``[B, B]`` uniforms to use instead of drawing them (then ``seed`` is ignored).

    Returns:
        Scalar loss; 0 when the batch has no (positive pair, negative) combination or no active pair.

    Raises:
        ValueError: a static batch of fewer than 2 samples, or an embedding dimension
            that is unknown or < 2.
    """
    batch = embeddings.shape[0]
    if batch is not None and int(batch) < 2:
        raise ValueError(f"distance-weighted sampling needs at least 2 samples per batch, got {batch}.")
    labels = _pairs.flat_labels(labels)
    probs = distance_weighted_probabilities(embeddings, labels, cutoff, nonzero_loss_cutoff, weight_cap)
    b = tf.shape(labels)[0]
    if uniforms is None:
        uniforms = _pairs.stateless_or_random_uniform(tf.stack([b, b]), seed)
    neg_idx = sample_negatives(probs, tf.cast(uniforms, tf.float32))
    dist = _pairs.pairwise_distance(embeddings)
    d_an = tf.gather(dist, neg_idx, axis=1, batch_dims=1)  # [a, p] -> D(a, n_ap)
    beta = tf.reshape(tf.cast(beta, tf.float32), [-1])
    beta_a = tf.gather(beta, labels) if beta.shape[0] != 1 else tf.broadcast_to(beta, tf.shape(labels))
    beta_a = beta_a[:, None]
    valid = tf.logical_and(_pairs.positive_mask(labels), tf.reduce_any(probs > 0, axis=1)[:, None])
    validf = tf.cast(valid, tf.float32)
    pos = tf.nn.relu(alpha + dist - beta_a) * validf
    neg = tf.nn.relu(alpha - (d_an - beta_a)) * validf
    count = tf.reduce_sum(tf.cast(pos > 0, tf.float32)) + tf.reduce_sum(tf.cast(neg > 0, tf.float32))
    total = tf.reduce_sum(pos) + tf.reduce_sum(neg)
    if nu:
        total = total + nu * tf.reduce_sum(beta_a * validf)
    return tf.math.divide_no_nan(total, count)


@keras.saving.register_keras_serializable(package="detreg_keras")
class MarginLoss(DMLLoss):
    """Keras wrapper of :func:`margin_loss` that owns the learnable β (registry name ``"margin"``).

    β is a trainable weight named ``beta``: ``[C]`` (``beta_mode="class"``, the
    official code's class-specific β) or ``[1]`` (``"global"``), initialised to
    ``beta_init``. Under ``DRegModel`` it trains with the proxy learning rate
    (every weight of a ``dreg_loss_*`` layer does; the official code gives β its
    own rate, 0.1 with SGD).

    Args:
        num_classes: number of training classes ``C`` (needed by ``beta_mode="class"``).
        embedding_dim: unused (the sampler reads the dimension from the embeddings).
        alpha: α (0.2).
        beta_init: β₀ (1.2).
        beta_mode: ``"class"`` (default) or ``"global"``.
        nu: ν, weight of the β regulariser (0).
        cutoff: lower distance clip of the sampler (0.5).
        nonzero_loss_cutoff: upper distance cut of the sampler (1.4).
        weight_cap: λ cap on ``q^{-1}`` (``None``).
        seed: seed of the negative draws (a ``keras.random.SeedGenerator``).
        **kwargs: passed to :class:`DMLLoss`.
    """

    metric_name = "margin_loss"
    loss_fn = staticmethod(margin_loss)
    weight_args = ("beta",)
    layer_only = ("beta_init", "beta_mode")

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        alpha: float = 0.2,
        beta_init: float = 1.2,
        beta_mode: str = "class",
        nu: float = 0.0,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
        weight_cap: float | None = None,
        seed: int | None = None,
        **kwargs,
    ):
        if beta_mode not in BETA_MODES:
            raise ValueError(f"beta_mode must be one of {BETA_MODES}, got {beta_mode!r}.")
        if beta_mode == "class" and (num_classes is None or int(num_classes) < 1):
            raise ValueError(f"MarginLoss with beta_mode='class' needs num_classes >= 1, got {num_classes!r}.")
        if not 0.0 < float(cutoff) < float(nonzero_loss_cutoff):
            raise ValueError(
                f"MarginLoss needs 0 < cutoff < nonzero_loss_cutoff, got cutoff={cutoff}, "
                f"nonzero_loss_cutoff={nonzero_loss_cutoff}."
            )
        if weight_cap is not None and float(weight_cap) <= 0:
            raise ValueError(f"MarginLoss needs weight_cap > 0 or None, got {weight_cap!r}.")
        hyper = {
            "alpha": float(alpha),
            "beta_init": float(beta_init),
            "beta_mode": str(beta_mode),
            "nu": float(nu),
            "cutoff": float(cutoff),
            "nonzero_loss_cutoff": float(nonzero_loss_cutoff),
            "weight_cap": None if weight_cap is None else float(weight_cap),
            "seed": seed,
        }
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper=hyper, **kwargs)

    def build(self, input_shape=None):
        size = self.num_classes if self.beta_mode == "class" else 1
        self.beta = self.add_weight(
            name="beta", shape=(size,), initializer=keras.initializers.Constant(self.beta_init), trainable=True
        )
        self.built = True
