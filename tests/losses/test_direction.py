"""Direction-regularised triplet loss against a loop reference with explicit vectors."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from detreg_keras import losses
from detreg_keras.losses.direction import (
    DirectionRegularizedTripletLoss,
    direction_cosines,
    direction_regularized_triplet_loss,
)
from detreg_keras.losses.triplet import triplet_margin_loss

from ._helpers import BATCHES, GENERIC, assert_all_finite, normalize, train_one_step, value_and_grads
from .test_margin import clustered
from .test_triplet import label_candidates, reference_distances


def reference_cos(x, a, p, n):
    """cos of the angle between x_n - (x_a + x_p)/2 and x_p - x_a (0 when either vector vanishes)."""
    u = x[n] - 0.5 * (x[a] + x[p])
    v = x[p] - x[a]
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    return float(u @ v / (nu * nv)) if nu > 1e-6 and nv > 1e-6 else 0.0


def reference_dr_triplet(x, y, margin, gamma, mining, squared=False):
    """Mined triplets as in the triplet reference, each active one + γ |cos θ_apn|; first index on ties."""
    xn = normalize(x)
    dist = reference_distances(x, squared)
    positives, negatives = label_candidates(y)

    def cost(a, p, n):
        hinge = dist[a, p] - dist[a, n] + margin
        return hinge + gamma * abs(reference_cos(xn, a, p, n)) if hinge > 0 else 0.0

    b = len(y)
    if mining == "all":
        values = [cost(a, p, n) for a in range(b) for p in positives[a] for n in negatives[a]]
        active = [v for v in values if v > 0]
        return sum(active) / len(active) if active else 0.0
    values = []
    for a in range(b):
        if not negatives[a]:
            continue
        if mining == "hard":
            if positives[a]:
                p = max(positives[a], key=lambda j: (dist[a, j], -j))
                n = min(negatives[a], key=lambda j: (dist[a, j], j))
                values.append(cost(a, p, n))
            continue
        for p in positives[a]:
            farther = [n for n in negatives[a] if dist[a, n] > dist[a, p]]
            if farther:
                n = min(farther, key=lambda j: (dist[a, j], j))
            else:
                n = max(negatives[a], key=lambda j: (dist[a, j], -j))
            values.append(cost(a, p, n))
    return float(np.mean(values)) if values else 0.0


def test_cosines_match_explicit_vectors():
    x = normalize(BATCHES["mixed"][0])
    ours = direction_cosines(tf.constant(x, tf.float32)).numpy()
    b = len(x)
    expected = np.array([[[reference_cos(x, a, p, n) for n in range(b)] for p in range(b)] for a in range(b)])
    np.testing.assert_allclose(ours, expected, atol=2e-5)
    # the ties batch (duplicates, a zero vector): undefined directions give 0, never NaN
    assert np.isfinite(direction_cosines(tf.constant(BATCHES["ties"][0])).numpy()).all()


@pytest.mark.parametrize("batch", list(GENERIC) + ["clustered_64x128"])
@pytest.mark.parametrize("mining", ["all", "hard", "semihard"])
@pytest.mark.parametrize("margin,gamma,squared", [(0.2, 0.1, False), (0.5, 0.7, True)])
def test_matches_loop_reference(batch, mining, margin, gamma, squared):
    x, y = clustered(16, 4, 128) if batch == "clustered_64x128" else BATCHES[batch]
    value, grads = value_and_grads(
        lambda e, l: direction_regularized_triplet_loss(
            e, l, margin=margin, gamma=gamma, mining=mining, squared=squared
        ),
        x,
        y,
    )
    expected = reference_dr_triplet(x, y, margin, gamma, mining, squared)
    np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-5)
    assert_all_finite(value, grads)


@pytest.mark.parametrize("mining", ["all", "hard", "semihard"])
def test_gamma_zero_is_the_triplet_loss_and_ties_stay_finite(mining):
    for name in sorted(BATCHES):
        x, y = BATCHES[name]
        plain = float(triplet_margin_loss(x, y, mining=mining))
        no_dr = float(direction_regularized_triplet_loss(x, y, gamma=0.0, mining=mining))
        assert no_dr == pytest.approx(plain, abs=1e-7)
        value, grads = value_and_grads(lambda e, l: direction_regularized_triplet_loss(e, l, mining=mining), x, y)
        assert_all_finite(value, grads)
        assert value >= plain - 1e-6


def test_hand_computed_triplet():
    # a = e1, p = e2, c = (e1 + e2)/2. n1 = e3 is as far from a as from p: no penalty.
    # n2 = (e1 + e3)/sqrt2 leans towards a: <n2 - c, p - a> = -1/sqrt2, |n2 - c|^2 = 3/2 - 1/sqrt2, |p - a| = sqrt2.
    e1, e2, e3 = np.eye(3)
    n2 = (e1 + e3) / np.sqrt(2.0)
    x = np.stack([e1, e2, e3]).astype(np.float32)
    y = np.array([0, 0, 1])
    margin = 2.0  # every triplet active
    base = float(triplet_margin_loss(x, y, margin=margin))
    assert float(direction_regularized_triplet_loss(x, y, margin=margin, gamma=1.0)) == pytest.approx(base, abs=1e-6)
    x2 = np.stack([e1, e2, n2]).astype(np.float32)
    cos = (-1 / np.sqrt(2.0)) / (np.sqrt(1.5 - 1 / np.sqrt(2.0)) * np.sqrt(2.0))
    # triplets (0, 1, 2) and (1, 0, 2) have the same |cos|; the mean over the 2 active ones adds gamma |cos|
    expected = float(triplet_margin_loss(x2, y, margin=margin)) + 0.5 * abs(cos)
    got = float(direction_regularized_triplet_loss(x2, y, margin=margin, gamma=0.5))
    assert got == pytest.approx(expected, rel=1e-5)


def test_layer_config_and_bad_input():
    layer = losses.get("triplet_dr", gamma=0.3, mining="semihard", margin=0.25, squared=True)
    assert isinstance(layer, DirectionRegularizedTripletLoss) and not layer.has_proxies
    clone = DirectionRegularizedTripletLoss.from_config(layer.get_config())
    assert (clone.gamma, clone.mining, clone.margin, clone.squared) == (0.3, "semihard", 0.25, True)
    x, y = BATCHES["mixed"]
    assert float(clone(x, y)) == float(layer(x, y))
    with pytest.raises(ValueError, match="mining"):
        DirectionRegularizedTripletLoss(mining="easy")
    with pytest.raises(ValueError, match="gamma"):
        DirectionRegularizedTripletLoss(gamma=-1.0)


def test_dreg_model_trains_a_step_with_triplet_dr():
    train_one_step("triplet_dr", {"mining": "semihard"})
