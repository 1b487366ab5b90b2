"""Contrastive loss against a loop-over-pairs numpy reference (PML's AvgNonZero form)."""

from __future__ import annotations

import numpy as np
import pytest

from detreg_keras.losses.contrastive import ContrastiveLoss, contrastive_loss

from ._helpers import BATCHES, assert_all_finite, normalize, value_and_grads


def reference_contrastive(x, y, pos_margin=0.0, neg_margin=1.0, power=1.0):
    x = normalize(x)
    pos_losses, neg_losses = [], []
    for i in range(len(y)):
        for j in range(len(y)):
            if i == j:
                continue
            d = np.linalg.norm(x[i] - x[j])
            if y[i] == y[j]:
                pos_losses.append(max(d - pos_margin, 0.0) ** power)
            else:
                neg_losses.append(max(neg_margin - d, 0.0) ** power)

    def avg_non_zero(losses):
        active = [v for v in losses if v > 0]
        return sum(active) / len(active) if active else 0.0

    return avg_non_zero(pos_losses) + avg_non_zero(neg_losses)


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("params", [{}, {"pos_margin": 0.3, "neg_margin": 1.2, "power": 2.0}])
def test_matches_reference(batch, params):
    x, y = BATCHES[batch]
    value, grads = value_and_grads(lambda e, l: contrastive_loss(e, l, **params), x, y)
    np.testing.assert_allclose(value, reference_contrastive(x, y, **params), rtol=1e-4, atol=1e-5)
    assert_all_finite(value, grads)


def test_hand_computed():
    # Two positives at 90 degrees (d = sqrt 2) and one negative identical to the anchor (d = 0).
    x = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
    y = np.array([0, 0, 1])
    # positive pairs: (0,1), (1,0): d = sqrt2 each -> mean sqrt2.
    # negative pairs: (0,2),(2,0): 1 - 0 = 1; (1,2),(2,1): 1 - sqrt2 < 0 -> inactive. mean 1.
    np.testing.assert_allclose(float(contrastive_loss(x, y)), np.sqrt(2.0) + 1.0, rtol=1e-6)


def test_no_pairs_is_zero():
    x, y = BATCHES["singletons"]
    far = np.eye(5, 4, dtype=np.float32)  # pairwise distances sqrt2 or 1, all > 0.5
    assert float(contrastive_loss(far, y, neg_margin=0.5)) == 0.0
    assert float(contrastive_loss(x, np.zeros(5, np.int32), pos_margin=5.0)) == 0.0


def test_layer_config():
    layer = ContrastiveLoss(pos_margin=0.1, neg_margin=0.8, power=2.0)
    clone = ContrastiveLoss.from_config(layer.get_config())
    assert (clone.pos_margin, clone.neg_margin, clone.power) == (0.1, 0.8, 2.0)
    assert ContrastiveLoss().get_config()["neg_margin"] == 1.0
