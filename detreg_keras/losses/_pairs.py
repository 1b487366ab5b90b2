"""Shared pair helpers of the DML losses: similarities, distances, label masks, stable reductions.

Every helper is a pure TensorFlow function that works in eager mode and inside
``tf.function`` with a dynamic batch size. The reductions are written so that
both their values and their gradients stay finite when a mask selects nothing
(a class with a single sample, a batch with a single class): masked entries are
*replaced* before ``exp``/``sqrt`` rather than set to ``-inf``, so no
``inf * 0`` or ``0 / 0`` reaches the backward pass.
"""

from __future__ import annotations

import tensorflow as tf

#: Floor under squared distances before the square root (the gradient of
#: ``sqrt`` at 0 is infinite; entries below it are returned as exactly 0).
_SQRT_EPS = 1e-12


def l2_normalize(x: tf.Tensor) -> tf.Tensor:
    """L2-normalise the rows of ``x`` (cast to float32); zero rows stay zero."""
    return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1, epsilon=1e-12)


def flat_labels(labels: tf.Tensor) -> tf.Tensor:
    """Labels as a flat ``int32`` vector ``[B]``."""
    return tf.cast(tf.reshape(labels, [-1]), tf.int32)


def cosine_similarity_matrix(embeddings: tf.Tensor, normalize: bool = True) -> tf.Tensor:
    """Pairwise similarity ``S_ij = <x_i, x_j>`` of the (normalised) rows, ``[B, B]``.

    Args:
        embeddings: ``[B, D]`` embeddings.
        normalize: L2-normalise the rows first, so ``S`` is the cosine similarity.
    """
    x = l2_normalize(embeddings) if normalize else tf.cast(embeddings, tf.float32)
    return tf.matmul(x, x, transpose_b=True)


def safe_sqrt(squared: tf.Tensor) -> tf.Tensor:
    """``sqrt`` whose value and gradient are exactly 0 where ``squared <= 1e-12``."""
    positive = squared > _SQRT_EPS
    return tf.where(positive, tf.sqrt(tf.where(positive, squared, tf.ones_like(squared))), tf.zeros_like(squared))


def pairwise_distance(embeddings: tf.Tensor, squared: bool = False, normalize: bool = True) -> tf.Tensor:
    """Pairwise Euclidean distances ``D_ij = ||x_i - x_j||`` as ``[B, B]``.

    The diagonal is exactly 0 and so is its gradient (no NaN from ``sqrt(0)``).

    Args:
        embeddings: ``[B, D]`` embeddings.
        squared: return ``||x_i - x_j||^2`` instead.
        normalize: L2-normalise the rows first (then ``D^2 = 2 - 2 cos``).
    """
    x = l2_normalize(embeddings) if normalize else tf.cast(embeddings, tf.float32)
    sq_norm = tf.reduce_sum(tf.square(x), axis=-1)
    d2 = sq_norm[:, None] + sq_norm[None, :] - 2.0 * tf.matmul(x, x, transpose_b=True)
    d2 = tf.maximum(d2, 0.0)
    d2 = d2 * (1.0 - tf.eye(tf.shape(x)[0], dtype=d2.dtype))  # exact zeros on the diagonal
    return d2 if squared else safe_sqrt(d2)


def same_label_matrix(labels: tf.Tensor) -> tf.Tensor:
    """``[B, B]`` boolean, ``y_i == y_j`` (diagonal included)."""
    labels = flat_labels(labels)
    return tf.equal(labels[:, None], labels[None, :])


def positive_mask(labels: tf.Tensor) -> tf.Tensor:
    """``[B, B]`` boolean: ``y_i == y_j`` and ``i != j`` (the positive pairs)."""
    same = same_label_matrix(labels)
    not_diag = tf.logical_not(tf.eye(tf.shape(same)[0], dtype=tf.bool))
    return tf.logical_and(same, not_diag)


def negative_mask(labels: tf.Tensor) -> tf.Tensor:
    """``[B, B]`` boolean: ``y_i != y_j`` (the negative pairs)."""
    return tf.logical_not(same_label_matrix(labels))


def masked_logsumexp(
    x: tf.Tensor,
    mask: tf.Tensor,
    axis: int = -1,
    keepdims: bool = False,
    add_one: bool = False,
) -> tf.Tensor:
    """``log Σ_{mask} exp(x)`` (or ``log(1 + Σ_{mask} exp(x))``) along ``axis``, stably.

    A slice whose mask is empty gives 0 (``log 1`` with ``add_one``; with
    ``add_one=False`` the value is mathematically ``-inf`` and is returned as 0,
    so callers must drop such slices with their own validity mask). Gradients
    are finite everywhere and zero on masked-out entries.

    Args:
        x: logits.
        mask: boolean, broadcastable to ``x``: which entries enter the sum.
        axis: reduction axis.
        keepdims: keep the reduced axis.
        add_one: include an extra ``exp(0)`` term (the ``1 +`` of a softplus).
    """
    mask = tf.broadcast_to(tf.cast(mask, tf.bool), tf.shape(x))
    any_valid = tf.reduce_any(mask, axis=axis, keepdims=True)
    row_max = tf.reduce_max(tf.where(mask, x, tf.fill(tf.shape(x), x.dtype.min)), axis=axis, keepdims=True)
    if add_one:
        row_max = tf.maximum(row_max, 0.0)
    shift = tf.stop_gradient(tf.where(any_valid, row_max, tf.zeros_like(row_max)))
    safe_x = tf.where(mask, x, tf.broadcast_to(shift, tf.shape(x)))
    total = tf.reduce_sum(tf.exp(safe_x - shift) * tf.cast(mask, x.dtype), axis=axis, keepdims=True)
    if add_one:
        total = total + tf.exp(-shift)
    ok = total > 0
    out = tf.where(ok, tf.math.log(tf.where(ok, total, tf.ones_like(total))) + shift, tf.zeros_like(total))
    return out if keepdims else tf.squeeze(out, axis=axis)


def masked_max(x: tf.Tensor, mask: tf.Tensor, axis: int = -1) -> tf.Tensor:
    """Max of ``x`` over ``mask`` along ``axis``; 0 where the mask is empty."""
    mask = tf.broadcast_to(tf.cast(mask, tf.bool), tf.shape(x))
    value = tf.reduce_max(tf.where(mask, x, tf.fill(tf.shape(x), x.dtype.min)), axis=axis)
    return tf.where(tf.reduce_any(mask, axis=axis), value, tf.zeros_like(value))


def masked_min(x: tf.Tensor, mask: tf.Tensor, axis: int = -1) -> tf.Tensor:
    """Min of ``x`` over ``mask`` along ``axis``; 0 where the mask is empty."""
    mask = tf.broadcast_to(tf.cast(mask, tf.bool), tf.shape(x))
    value = tf.reduce_min(tf.where(mask, x, tf.fill(tf.shape(x), x.dtype.max)), axis=axis)
    return tf.where(tf.reduce_any(mask, axis=axis), value, tf.zeros_like(value))


def masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Mean of ``values`` over ``mask`` (all axes); 0 when the mask is empty."""
    mask = tf.cast(mask, values.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(values * mask), tf.reduce_sum(mask))


def mean_over_nonzero(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Sum of the masked ``values`` divided by how many of them are ``> 0``.

    The "average over non-zero losses" reduction of pytorch-metric-learning's
    ``AvgNonZeroReducer``; 0 when none is positive.
    """
    mask = tf.cast(mask, tf.bool)
    values = tf.where(mask, values, tf.zeros_like(values))
    count = tf.reduce_sum(tf.cast(values > 0, values.dtype))
    return tf.math.divide_no_nan(tf.reduce_sum(values), count)


def stateless_or_random_uniform(shape: tf.Tensor, seed: tf.Tensor | None = None) -> tf.Tensor:
    """Uniform ``[0, 1)`` samples: stateless when ``seed`` (an int ``[2]`` tensor) is given.

    Loss layers pass ``keras.random.SeedGenerator.next()`` so that a seeded
    layer is reproducible; ``None`` draws from TensorFlow's global generator.
    """
    if seed is None:
        return tf.random.uniform(shape, dtype=tf.float32)
    seed = tf.cast(tf.reshape(seed, [-1])[:2], tf.int64)
    return tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32)
