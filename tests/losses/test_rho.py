"""ρ-regularised triplet loss and the ρ spectrum metric against loop / scipy references."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy.stats import entropy

from detreg_keras.losses.rho import RhoTripletLoss, normalized_singular_spectrum, rho_spectrum, rho_triplet_loss
from detreg_keras.losses.triplet import triplet_margin_loss

from ._helpers import BATCHES, assert_all_finite, value_and_grads
from .test_triplet import label_candidates, reference_distances, reference_triplet


def switched_candidates(y, switch):
    """Roth et al.'s switch: a switched anchor with a same-class sample uses the triplets (a, a, p*)."""
    positives, negatives = label_candidates(y)
    for a in range(len(y)):
        if switch[a] and positives[a]:
            positives[a], negatives[a] = [a], list(positives[a])
    return positives, negatives


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("mining", ["all", "hard", "semihard"])
def test_explicit_switch_matches_reference(batch, mining):
    x, y = BATCHES[batch]
    switch = np.arange(len(y)) % 2 == 0
    value, grads = value_and_grads(
        lambda e, l: rho_triplet_loss(e, l, margin=0.3, mining=mining, switch=tf.constant(switch)), x, y
    )
    expected = reference_triplet(reference_distances(x), *switched_candidates(y, switch), 0.3, mining)
    np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-5)
    assert_all_finite(value, grads)


@pytest.mark.parametrize("mining", ["all", "hard", "semihard"])
def test_rho_zero_is_the_triplet_loss_and_rho_one_switches_all(mining):
    x, y = BATCHES["mixed"]
    np.testing.assert_allclose(
        float(rho_triplet_loss(x, y, rho=0.0, mining=mining)), float(triplet_margin_loss(x, y, mining=mining))
    )
    all_switched = rho_triplet_loss(x, y, mining=mining, switch=tf.ones([len(y)], tf.bool))
    np.testing.assert_allclose(float(rho_triplet_loss(x, y, rho=1.0, mining=mining)), float(all_switched))


def test_seeded_draws_are_reproducible_and_about_rho():
    labels = np.repeat(np.arange(200), 2)
    x = np.random.default_rng(0).normal(size=(400, 8)).astype(np.float32)
    a = float(rho_triplet_loss(x, labels, rho=0.3, mining="hard", seed=tf.constant([1, 2])))
    b = float(rho_triplet_loss(x, labels, rho=0.3, mining="hard", seed=tf.constant([1, 2])))
    c = float(rho_triplet_loss(x, labels, rho=0.3, mining="hard", seed=tf.constant([3, 4])))
    assert a == b and a != c
    u = tf.random.stateless_uniform([400], seed=tf.constant([1, 2], tf.int64)).numpy()
    assert 0.2 < np.mean(u < 0.3) < 0.4


def test_layer_config_round_trip():
    layer = RhoTripletLoss(rho=0.35, margin=0.1, mining="semihard", squared=True, seed=5)
    config = layer.get_config()
    assert {k: config[k] for k in ("rho", "margin", "mining", "squared", "seed")} == {
        "rho": 0.35,
        "margin": 0.1,
        "mining": "semihard",
        "squared": True,
        "seed": 5,
    }
    x, y = BATCHES["mixed"]
    np.testing.assert_allclose(float(RhoTripletLoss.from_config(config)(x, y)), float(layer(x, y)))
    with pytest.raises(ValueError, match="rho"):
        RhoTripletLoss(rho=1.5)


def _singular_values(x):
    # independent of np.linalg.svd: square roots of the eigenvalues of XᵀX, descending.
    eig = np.linalg.eigvalsh(np.asarray(x, np.float64).T @ np.asarray(x, np.float64))
    return np.sqrt(np.clip(eig, 0.0, None))[::-1]


@pytest.mark.parametrize("skip", [0, 1, 3])
def test_rho_spectrum_matches_scipy_entropy(skip):
    x = np.random.default_rng(0).normal(size=(50, 8)) * np.linspace(3.0, 0.2, 8)
    s = _singular_values(x)[skip:]
    s_norm = s / s.sum()
    uniform = np.full(len(s), 1.0 / len(s))
    np.testing.assert_allclose(rho_spectrum(x, skip=skip), entropy(uniform, s_norm), rtol=1e-6)
    np.testing.assert_allclose(rho_spectrum(x, skip=skip, reverse=True), entropy(s_norm, uniform), rtol=1e-6)
    np.testing.assert_allclose(normalized_singular_spectrum(x, skip=skip), s_norm, rtol=1e-6)


def test_rho_spectrum_orders_flat_and_compressed_embeddings():
    rng = np.random.default_rng(1)
    flat = np.linalg.qr(rng.normal(size=(16, 16)))[0][:, :8]  # orthonormal columns: all s equal
    assert rho_spectrum(flat) == pytest.approx(0.0, abs=1e-9)
    compressed = rng.normal(size=(64, 8)) * np.array([10.0, 1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    spread = rng.normal(size=(64, 8))
    assert rho_spectrum(compressed) > rho_spectrum(spread) > 0.0
    rank_one = np.outer(rng.normal(size=10), rng.normal(size=4))
    assert np.isfinite(rho_spectrum(rank_one)) and rho_spectrum(rank_one) > 5.0
    assert rho_spectrum(tf.constant(spread)) == pytest.approx(rho_spectrum(spread))
