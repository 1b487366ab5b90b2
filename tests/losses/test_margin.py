"""Margin loss with distance-weighted sampling against loop references written from Wu et al. (2017)."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from detreg_keras import losses
from detreg_keras.losses import _pairs
from detreg_keras.losses.margin import (
    MarginLoss,
    distance_weighted_probabilities,
    log_inverse_sphere_density,
    margin_loss,
    sample_negatives,
)

from ._helpers import BATCHES, assert_all_finite, normalize, train_one_step


def sphere_density(d, n):
    """q(d) on the unit sphere of R^n, normalised with the Beta function (scipy, not the module's lgamma)."""
    from scipy.special import betaln

    log_z = (n - 2) * math.log(2.0) + betaln((n - 1) / 2.0, (n - 1) / 2.0)
    return math.exp((n - 2) * math.log(d) + (n - 3) / 2.0 * math.log(1.0 - d * d / 4.0) - log_z)


def reference_probabilities(x, y, cutoff=0.5, nzc=1.4, cap=None):
    """Pr(n | a) ∝ min(λ, 1/q(max(d, cutoff))) over the negatives nearer than nzc (uniform fallback), loops."""
    x = normalize(x)
    b, n = x.shape
    probs = np.zeros((b, b))
    for a in range(b):
        negs = [j for j in range(b) if y[j] != y[a]]
        logw = {}
        for j in negs:
            d = max(np.linalg.norm(x[a] - x[j]), cutoff)
            if d < nzc:
                lw = -math.log(sphere_density(d, n)) if sphere_density(d, n) > 0 else math.inf
                logw[j] = min(lw, math.log(cap)) if cap is not None else lw
        if logw:
            top = max(logw.values())
            for j, lw in logw.items():
                probs[a, j] = math.exp(lw - top)
        else:
            for j in negs:
                probs[a, j] = 1.0
        if probs[a].sum() > 0:
            probs[a] /= probs[a].sum()
    return probs


def reference_draw(probs, uniforms):
    """Inverse CDF per (a, p): the first n whose cumulative probability exceeds u * total."""
    b = len(probs)
    out = np.zeros((b, b), int)
    for a in range(b):
        total = probs[a].sum()
        for p in range(b):
            acc = 0.0
            for j in range(b):
                acc += probs[a, j]
                if acc > uniforms[a, p] * total:
                    out[a, p] = j
                    break
    return out


def reference_margin(x, y, beta, uniforms, alpha=0.2, nu=0.0, cutoff=0.5, nzc=1.4, cap=None, draw=None):
    """(Σ [α + D_ap - β]_+ + Σ [α - D_an + β]_+ + ν Σ β) / #active, over (a, p) pairs and their drawn n."""
    probs = reference_probabilities(x, y, cutoff, nzc, cap)
    draw = reference_draw(probs, uniforms) if draw is None else draw
    xn = normalize(x)
    beta = np.reshape(beta, -1)
    total, count = 0.0, 0
    for a in range(len(y)):
        if probs[a].sum() == 0:
            continue
        b_a = beta[0] if len(beta) == 1 else beta[y[a]]
        for p in range(len(y)):
            if p == a or y[p] != y[a]:
                continue
            n = draw[a, p]
            pos = max(alpha + np.linalg.norm(xn[a] - xn[p]) - b_a, 0.0)
            neg = max(alpha - (np.linalg.norm(xn[a] - xn[n]) - b_a), 0.0)
            total += pos + neg + nu * b_a
            count += int(pos > 0) + int(neg > 0)
    return total / count if count else 0.0


def clustered(num_classes, per_class, dim, seed=0, spread=0.6):
    """Realistic batch: m-per-class labels, class means sharing a common direction (negatives at 0.8-1.4)."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=dim)
    means = common + rng.normal(size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    x = means[labels] + spread * rng.normal(size=(len(labels), dim))
    return x.astype(np.float32), labels


def uniforms_for(b, seed=0):
    return np.random.default_rng(seed).uniform(size=(b, b)).astype(np.float32)


def test_density_is_the_distance_law_of_random_unit_vectors():
    # normalised: integrates to 1 on [0, 2]; and matches the mean distance of random points on S^{n-1}
    rng = np.random.default_rng(0)
    for n in (4, 16, 128):
        grid = np.linspace(1e-6, 2 - 1e-6, 200001)
        q = np.exp(-log_inverse_sphere_density(tf.constant(grid, tf.float32), n).numpy().astype(np.float64))
        np.testing.assert_allclose(np.trapezoid(q, grid), 1.0, rtol=2e-3)
        pts = normalize(rng.normal(size=(20000, n)))
        emp = np.linalg.norm(pts[:10000] - pts[10000:], axis=1)
        np.testing.assert_allclose(np.trapezoid(grid * q, grid), emp.mean(), rtol=5e-3)
        assert math.isclose(sphere_density(1.3, n), float(np.exp(-log_inverse_sphere_density(1.3, n))), rel_tol=1e-4)


@pytest.mark.parametrize("case", ["mixed", "ties", "absent", "one_class", "clustered_64x128", "far_negatives"])
@pytest.mark.parametrize("cap", [None, 50.0])
def test_probabilities_match_loop_reference(case, cap):
    if case == "clustered_64x128":
        x, y = clustered(16, 4, 128)
    elif case == "far_negatives":  # every negative beyond 1.4: the uniform fallback
        x, y = np.array([[1, 0], [0.9, 0.1], [-1, 0], [-0.9, -0.1]], np.float32), np.array([0, 0, 1, 1])
    else:
        x, y = BATCHES[case]
    ours = distance_weighted_probabilities(tf.constant(x), tf.constant(y), weight_cap=cap).numpy()
    expected = reference_probabilities(x, y, cap=cap)
    np.testing.assert_allclose(ours, expected, rtol=2e-4, atol=1e-6)
    if case == "clustered_64x128":
        near = (expected > 0).sum(axis=1)
        assert near.min() >= 2 and (expected.max(axis=1) < 0.999).all()  # not one-hot (peaked at d = 128)


@pytest.mark.parametrize("case", ["mixed", "ties", "absent", "clustered_64x128"])
@pytest.mark.parametrize("beta_kind", ["global", "class"])
def test_loss_matches_loop_reference_with_the_same_uniforms(case, beta_kind):
    x, y = clustered(16, 4, 128) if case == "clustered_64x128" else BATCHES[case]
    num_classes = int(y.max()) + 1
    rng = np.random.default_rng(7)
    beta = np.array([1.1]) if beta_kind == "global" else rng.uniform(0.9, 1.3, size=num_classes)
    u = uniforms_for(len(y))
    probs = distance_weighted_probabilities(tf.constant(x), tf.constant(y)).numpy()
    ours_draw = sample_negatives(tf.constant(probs, tf.float32), tf.constant(u)).numpy()
    ref_draw = reference_draw(reference_probabilities(x, y), u)
    pos = [(a, p) for a in range(len(y)) for p in range(len(y)) if p != a and y[p] == y[a] and probs[a].sum() > 0]
    assert all(ours_draw[a, p] == ref_draw[a, p] for a, p in pos)
    for kwargs in ({}, {"nu": 0.05, "alpha": 0.3}):
        value = float(margin_loss(x, y, tf.constant(beta, tf.float32), uniforms=u, **kwargs))
        np.testing.assert_allclose(value, reference_margin(x, y, beta, u, **kwargs), rtol=1e-4, atol=1e-6)


def test_draws_follow_the_probabilities():
    x, y = clustered(4, 4, 32, seed=3)
    probs = distance_weighted_probabilities(tf.constant(x), tf.constant(y)).numpy()
    u = tf.random.stateless_uniform([16, 4000], seed=[1, 2])
    draws = sample_negatives(tf.constant(probs, tf.float32), u).numpy()
    for a in range(16):
        freq = np.bincount(draws[a], minlength=16) / 4000
        np.testing.assert_allclose(freq, probs[a], atol=0.03)
        assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs[a]))  # never a positive or a far negative


def test_seeded_draws_are_deterministic():
    x, y = clustered(8, 4, 16, seed=1)
    a = margin_loss(x, y, [1.2], seed=tf.constant([3, 4]))
    b = margin_loss(x, y, [1.2], seed=tf.constant([3, 4]))
    assert float(a) == float(b)
    values = {float(margin_loss(x, y, [1.2], seed=tf.constant([s, 0]))) for s in range(6)}
    assert len(values) > 1  # the seed does change the draw
    first, second = MarginLoss(num_classes=8, seed=5), MarginLoss(num_classes=8, seed=5)
    seq1 = [float(first(x, y)) for _ in range(3)]
    seq2 = [float(second(x, y)) for _ in range(3)]
    assert seq1 == seq2


def test_gradients_finite_and_beta_moves_the_boundary():
    x, y = clustered(16, 4, 128, seed=2)
    layer = losses.get("margin", num_classes=16, embedding_dim=128, seed=0)
    layer.build(None)
    assert [w.path.split("/")[-1] for w in layer.trainable_weights] == ["beta"]
    np.testing.assert_allclose(layer.beta.numpy(), np.full(16, 1.2))
    var = tf.Variable(x)
    with tf.GradientTape() as tape:
        loss = layer(var, y)
    g_x, g_beta = tape.gradient(loss, [var, layer.beta])
    assert_all_finite(float(loss), [g_x.numpy(), g_beta.numpy()])
    assert np.any(g_beta.numpy() != 0)
    for name in sorted(BATCHES):  # degenerate batches: finite value and gradient
        xb, yb = BATCHES[name]
        var = tf.Variable(xb)
        with tf.GradientTape() as tape:
            loss = margin_loss(var, yb, tf.constant([1.2]), seed=tf.constant([0, 0]))
        grad = tape.gradient(loss, var)
        assert_all_finite(float(loss), [np.zeros(1) if grad is None else grad.numpy()])


def test_global_beta_and_config_round_trip():
    layer = MarginLoss(num_classes=None, beta_mode="global", beta_init=1.0, alpha=0.1, nu=0.01, weight_cap=20.0, seed=2)
    layer.build(None)
    assert layer.beta.shape == (1,)
    config = layer.get_config()
    clone = MarginLoss.from_config(config)
    clone.build(None)
    x, y = clustered(4, 4, 16)
    assert float(clone(x, y)) == float(layer(x, y))  # same seed, same first draw
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert restored.get_config() == config


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least 2 samples"):
        margin_loss(np.ones((1, 8), np.float32), np.array([0]), [1.2])
    with pytest.raises(ValueError, match="num_classes"):
        MarginLoss(num_classes=None)
    with pytest.raises(ValueError, match="beta_mode"):
        MarginLoss(num_classes=3, beta_mode="per_sample")
    with pytest.raises(ValueError, match="cutoff"):
        MarginLoss(num_classes=3, cutoff=1.5, nonzero_loss_cutoff=1.4)
    with pytest.raises(ValueError, match="embedding dimension"):
        margin_loss(np.ones((4, 1), np.float32), np.array([0, 0, 1, 1]), [1.2])

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None], tf.int32)])
    def unknown_dim(e, l):
        return margin_loss(e, l, [1.2])

    with pytest.raises(ValueError, match="static embedding dimension"):
        unknown_dim(np.ones((4, 3), np.float32), np.array([0, 0, 1, 1], np.int32))


def test_batch_without_positive_pair_or_negative_costs_nothing():
    for name in ("singletons", "one_class"):
        x, y = BATCHES[name]
        assert float(margin_loss(x, y, [1.2], seed=tf.constant([0, 0]))) == 0.0


def test_dreg_model_trains_a_step_with_margin_loss():
    train_one_step("margin", {"seed": 0}, expected_weight="beta")


def test_pairs_uniform_helper_is_reused():
    # the draw uses the family's seeded uniform helper: same seed, same uniforms as _pairs
    u = _pairs.stateless_or_random_uniform(tf.constant([3, 3]), tf.constant([9, 9])).numpy()
    x, y = clustered(1, 3, 8)[0], np.array([0, 0, 1])
    assert float(margin_loss(x, y, [1.2], seed=tf.constant([9, 9]))) == float(margin_loss(x, y, [1.2], uniforms=u))
