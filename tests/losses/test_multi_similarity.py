"""Multi-similarity loss + MS mining against a loop reference of the official implementation."""

from __future__ import annotations

import numpy as np
import pytest

from detreg_keras.losses.multi_similarity import MultiSimilarityLoss, multi_similarity_loss

from ._helpers import BATCHES, assert_all_finite, normalize, value_and_grads


def reference_ms(x, y, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
    x = normalize(x)
    b = len(y)
    total = 0.0
    for i in range(b):
        pos_all = [x[i] @ x[j] for j in range(b) if j != i and y[j] == y[i]]
        neg_all = [x[i] @ x[k] for k in range(b) if y[k] != y[i]]
        if epsilon is None:
            pos, neg = pos_all, neg_all
        else:
            if not pos_all or not neg_all:
                continue
            neg = [s for s in neg_all if s + epsilon > min(pos_all)]  # negative mining
            pos = [s for s in pos_all if s - epsilon < max(neg_all)]  # positive mining
        if not pos or not neg:
            continue
        total += np.log1p(sum(np.exp(-alpha * (s - base)) for s in pos)) / alpha
        total += np.log1p(sum(np.exp(beta * (s - base)) for s in neg)) / beta
    return total / b


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize(
    "params", [{}, {"epsilon": None}, {"alpha": 1.0, "beta": 20.0, "base": 0.3, "epsilon": 0.5}]
)
def test_matches_reference(batch, params):
    x, y = BATCHES[batch]
    value, grads = value_and_grads(lambda e, l: multi_similarity_loss(e, l, **params), x, y)
    np.testing.assert_allclose(value, reference_ms(x, y, **params), rtol=1e-4, atol=1e-6)
    assert_all_finite(value, grads)


def test_mining_drops_easy_pairs():
    # Anchor 0: positive at cos 0.9, negatives at cos -1 (easy, dropped) and 0.85 (hard, kept).
    x = np.array([[1, 0], [0.9, np.sqrt(1 - 0.81)], [-1, 0], [0.85, -np.sqrt(1 - 0.85**2)]], np.float32)
    y = np.array([0, 0, 1, 2])
    value = float(multi_similarity_loss(x, y))
    np.testing.assert_allclose(value, reference_ms(x, y), rtol=1e-5)
    assert value != pytest.approx(reference_ms(x, y, epsilon=None), rel=1e-3)


def test_large_beta_is_stable():
    x, y = BATCHES["ties"]
    value, grads = value_and_grads(lambda e, l: multi_similarity_loss(e, l, beta=500.0, epsilon=None), x, y)
    assert_all_finite(value, grads)


def test_layer_config():
    layer = MultiSimilarityLoss(alpha=3.0, beta=40.0, base=0.4, epsilon=None)
    clone = MultiSimilarityLoss.from_config(layer.get_config())
    assert (clone.alpha, clone.beta, clone.base, clone.epsilon) == (3.0, 40.0, 0.4, None)
