"""The shared pair helpers: masks, distances, and the stable masked reductions."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from detreg_keras.losses import _pairs

from ._helpers import BATCHES, normalize


def test_label_masks_exclude_the_diagonal():
    y = np.array([3, 3, 1, 3, 7])
    pos = _pairs.positive_mask(y).numpy()
    neg = _pairs.negative_mask(y).numpy()
    for i in range(5):
        for j in range(5):
            assert pos[i, j] == (i != j and y[i] == y[j])
            assert neg[i, j] == (y[i] != y[j])


def test_distances_and_similarities_match_loops():
    x, _ = BATCHES["ties"]
    xn = normalize(x)
    dist = _pairs.pairwise_distance(x).numpy()
    sim = _pairs.cosine_similarity_matrix(x).numpy()
    for i in range(len(x)):
        for j in range(len(x)):
            np.testing.assert_allclose(dist[i, j], np.linalg.norm(xn[i] - xn[j]), atol=1e-3)
            np.testing.assert_allclose(sim[i, j], xn[i] @ xn[j], atol=1e-6)
    assert np.all(np.diag(dist) == 0.0)
    np.testing.assert_allclose(_pairs.pairwise_distance(x, squared=True).numpy(), dist**2, atol=1e-3)


def test_distance_gradient_is_finite_at_zero_distance():
    x = tf.Variable(BATCHES["ties"][0])  # holds duplicates and a zero vector
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(_pairs.pairwise_distance(x))
    assert np.all(np.isfinite(tape.gradient(total, x).numpy()))


def test_masked_logsumexp_values_and_gradients():
    x = np.array([[1.0, 2.0, 3.0], [500.0, -1.0, 0.5], [1e30, 2.0, -3.0], [0.0, 0.0, 0.0]], np.float32)
    mask = np.array([[True, False, True], [True, True, False], [False, False, False], [False, True, True]])
    for add_one in (False, True):
        variable = tf.Variable(x)
        with tf.GradientTape() as tape:
            out = _pairs.masked_logsumexp(variable, mask, axis=1, add_one=add_one)
            total = tf.reduce_sum(out)
        grad = tape.gradient(total, variable).numpy()
        for row in range(len(x)):
            terms = [float(v) for v, m in zip(x[row], mask[row]) if m] + ([0.0] if add_one else [])
            if not terms:
                assert out[row] == 0.0  # empty slice: 0 by convention
                assert np.all(grad[row] == 0.0)
                continue
            top = max(terms)
            expected = top + np.log(sum(np.exp(t - top) for t in terms))
            np.testing.assert_allclose(out[row], expected, rtol=1e-6)
            weights = np.exp(np.where(mask[row], x[row].astype(np.float64), -np.inf) - expected)
            np.testing.assert_allclose(grad[row], weights, rtol=1e-5, atol=1e-7)  # softmax; 0 off the mask
        assert np.all(np.isfinite(grad))


def test_masked_reductions_on_empty_masks():
    x = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    empty = tf.zeros([2, 2], tf.bool)
    assert np.all(_pairs.masked_max(x, empty).numpy() == 0.0)
    assert np.all(_pairs.masked_min(x, empty).numpy() == 0.0)
    assert float(_pairs.masked_mean(x, empty)) == 0.0
    assert float(_pairs.mean_over_nonzero(x, empty)) == 0.0
    np.testing.assert_allclose(float(_pairs.mean_over_nonzero(tf.constant([0.0, 2.0, 4.0]), [True, True, True])), 3.0)
