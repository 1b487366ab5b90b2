"""Between-sample augmentation of the DReg paper (Sec. 4, "Sample augmentation").

For a backbone feature ``z_i`` and a same-class neighbour ``z_j`` in the batch,

    z_ij = z_i + ε (z_j - z_i),      0 < ε < 1,

lies on the segment between them, in the "blank region" inside the class
cluster. The regulariser is evaluated on these points too (they enter ``Z1`` and
``Z2`` of Eq. 11), but not the DML loss. ``z_j`` is the nearest same-class
sample by cosine similarity (the paper restricts the partner to the
neighbourhood of ``z_i``).

Note: the paper prints ``e_ij = z_i - z_j`` with ``z_ij = z_i + ε e_ij``, which
would place the point *outside* the segment; the text says the new sample lies
"between two similar samples", which is what this module implements.
"""

from __future__ import annotations

import tensorflow as tf


def nearest_same_class_neighbor(features: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Index of each sample's most cosine-similar same-class partner in the batch.

    Args:
        features: ``[B, d]`` features.
        labels: ``[B]`` integer labels.

    Returns:
        ``(index [B] int32, has_partner [B] bool)``. A sample alone in its class
        in the batch (a singleton) has no partner: its index points at itself
        and ``has_partner`` is False.
    """
    features = tf.convert_to_tensor(features)
    labels = tf.reshape(tf.convert_to_tensor(labels), [-1])
    unit = tf.math.l2_normalize(tf.cast(features, tf.float32), axis=-1, epsilon=1e-12)
    sim = tf.matmul(unit, unit, transpose_b=True)
    batch = tf.shape(labels)[0]
    same = tf.equal(labels[:, None], labels[None, :])
    not_self = tf.logical_not(tf.eye(batch, dtype=tf.bool))
    candidates = tf.logical_and(same, not_self)
    masked = tf.where(candidates, sim, tf.fill(tf.shape(sim), tf.constant(-3.0, sim.dtype)))
    has_partner = tf.reduce_any(candidates, axis=1)
    index = tf.where(has_partner, tf.argmax(masked, axis=1, output_type=tf.int32), tf.range(batch))
    return index, has_partner


def interpolate(z_i: tf.Tensor, z_j: tf.Tensor, epsilon: float) -> tf.Tensor:
    """``z_i + ε (z_j - z_i)``: the point a fraction ε of the way from ``z_i`` to ``z_j``."""
    return z_i + epsilon * (z_j - z_i)


def between_sample_augment(
    features: tf.Tensor,
    labels: tf.Tensor,
    epsilon: float = 0.4,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Augmented points ``z_ij`` between each sample and its nearest same-class neighbour.

    Args:
        features: ``[B, d]`` backbone features ``z``.
        labels: ``[B]`` integer labels.
        epsilon: ε, the fraction of the way towards the partner (paper: 0.4).

    Returns:
        ``(augmented [B, d], valid [B] bool)``. For a singleton (no same-class
        partner in the batch) the row equals ``z_i`` and ``valid`` is False, so
        callers leave it out of ``R(Z)``.

    Raises:
        ValueError: if ε is outside ``[0, 1]``.
    """
    if not 0.0 <= float(epsilon) <= 1.0:
        raise ValueError(f"epsilon must lie in [0, 1] so that z_ij is between z_i and z_j, got {epsilon}.")
    index, valid = nearest_same_class_neighbor(features, labels)
    partners = tf.gather(features, index)
    return interpolate(features, partners, tf.cast(epsilon, features.dtype)), valid
