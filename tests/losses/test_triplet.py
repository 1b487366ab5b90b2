"""Triplet margin loss (batch-all / batch-hard / semi-hard) against loop references."""

from __future__ import annotations

import numpy as np
import pytest

from detreg_keras.losses.triplet import TripletMarginLoss, triplet_margin_loss

from ._helpers import BATCHES, assert_all_finite, normalize, value_and_grads


def reference_triplet(dist, positives, negatives, margin, mining):
    """Triplet loss from a distance matrix and per-anchor candidate lists.

    ``positives[a]`` / ``negatives[a]`` list the indices that may act as ``a``'s
    positive / negative (shared with the ρ-regularisation test).
    """
    b = len(dist)
    if mining == "all":  # all valid triplets, averaged over the non-zero ones
        losses = [
            max(dist[a, p] - dist[a, n] + margin, 0.0) for a in range(b) for p in positives[a] for n in negatives[a]
        ]
        active = [v for v in losses if v > 0]
        return sum(active) / len(active) if active else 0.0
    if mining == "hard":  # hardest positive and hardest negative per anchor
        losses = []
        for a in range(b):
            if positives[a] and negatives[a]:
                hardest_p = max(dist[a, p] for p in positives[a])
                hardest_n = min(dist[a, n] for n in negatives[a])
                losses.append(max(hardest_p - hardest_n + margin, 0.0))
        return float(np.mean(losses)) if losses else 0.0
    # semihard (FaceNet / tf triplet_semihard_loss): per (a, p), the closest negative farther than p;
    # when there is none, the farthest negative.
    losses = []
    for a in range(b):
        if not negatives[a]:
            continue
        for p in positives[a]:
            farther = [dist[a, n] for n in negatives[a] if dist[a, n] > dist[a, p]]
            chosen = min(farther) if farther else max(dist[a, n] for n in negatives[a])
            losses.append(max(dist[a, p] - chosen + margin, 0.0))
    return float(np.mean(losses)) if losses else 0.0


def reference_distances(x, squared=False):
    x = normalize(x)
    b = len(x)
    d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(b)] for i in range(b)])
    return d**2 if squared else d


def label_candidates(y):
    b = len(y)
    positives = [[p for p in range(b) if p != a and y[p] == y[a]] for a in range(b)]
    negatives = [[n for n in range(b) if y[n] != y[a]] for a in range(b)]
    return positives, negatives


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("mining", ["all", "hard", "semihard"])
@pytest.mark.parametrize("margin,squared", [(0.2, False), (0.5, True)])
def test_matches_reference(batch, mining, margin, squared):
    x, y = BATCHES[batch]
    value, grads = value_and_grads(
        lambda e, l: triplet_margin_loss(e, l, margin=margin, mining=mining, squared=squared), x, y
    )
    expected = reference_triplet(reference_distances(x, squared), *label_candidates(y), margin, mining)
    np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-5)
    assert_all_finite(value, grads)


def test_hand_computed_semihard_and_hard():
    # 1-D-like layout on the circle: anchor a=(1,0), positive at 60 deg, negatives at 90 and 180 deg.
    x = np.array([[1, 0], [0.5, np.sqrt(3) / 2], [0, 1], [-1, 0]], np.float32)
    y = np.array([0, 0, 1, 2])
    d_ap, d_90 = 1.0, np.sqrt(2.0)
    # semihard for (a=0, p=1): closest negative farther than 1 is the 90-degree one.
    # For (a=1, p=0): distances from p: to (0,1) = sqrt(2 - sqrt3), to (-1,0) = sqrt3; only sqrt3 > 1.
    d_p90 = np.sqrt(2.0 - np.sqrt(3.0))
    expected = np.mean([max(d_ap - d_90 + 0.5, 0), max(d_ap - np.sqrt(3.0) + 0.5, 0)])
    np.testing.assert_allclose(float(triplet_margin_loss(x, y, margin=0.5, mining="semihard")), expected, rtol=1e-5)
    # batch-hard: anchors 0 and 1 (2 and 3 have no positive); hardest negatives d_90 and d_p90.
    expected_hard = np.mean([max(d_ap - d_90 + 0.5, 0), max(d_ap - d_p90 + 0.5, 0)])
    np.testing.assert_allclose(float(triplet_margin_loss(x, y, margin=0.5, mining="hard")), expected_hard, rtol=1e-5)


def test_invalid_mining_rejected():
    with pytest.raises(ValueError, match="mining"):
        TripletMarginLoss(mining="easy")
    with pytest.raises(ValueError, match="mining"):
        triplet_margin_loss(np.eye(3, dtype=np.float32), np.array([0, 0, 1]), mining="batch")


def test_layer_config():
    layer = TripletMarginLoss(margin=0.3, mining="semihard", squared=True)
    clone = TripletMarginLoss.from_config(layer.get_config())
    assert (clone.margin, clone.mining, clone.squared) == (0.3, "semihard", True)
    x, y = BATCHES["mixed"]
    np.testing.assert_allclose(float(clone(x, y)), float(layer(x, y)))
