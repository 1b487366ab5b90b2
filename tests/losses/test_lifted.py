"""Smooth lifted structured loss against a loop reference of Oh Song et al."""

from __future__ import annotations

import numpy as np
import pytest

from detreg_keras.losses.lifted import LiftedStructureLoss, lifted_structure_loss

from ._helpers import BATCHES, GENERIC, assert_all_finite, normalize, value_and_grads


def reference_lifted(x, y, margin=1.0):
    x = normalize(x)
    b = len(y)

    def dist(i, j):
        return np.linalg.norm(x[i] - x[j])

    total, num_pairs = 0.0, 0
    for i in range(b):
        for j in range(i + 1, b):
            if y[i] != y[j]:
                continue
            terms = [np.exp(margin - dist(i, k)) for k in range(b) if y[k] != y[i]]
            terms += [np.exp(margin - dist(j, l)) for l in range(b) if y[l] != y[j]]
            if not terms:
                continue
            j_ij = np.log(sum(terms)) + dist(i, j)
            total += max(j_ij, 0.0) ** 2
            num_pairs += 1
    return total / (2 * num_pairs) if num_pairs else 0.0


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("margin", [1.0, 0.3])
def test_matches_reference(batch, margin):
    x, y = BATCHES[batch]
    value, grads = value_and_grads(lambda e, l: lifted_structure_loss(e, l, margin=margin), x, y)
    np.testing.assert_allclose(value, reference_lifted(x, y, margin), rtol=1e-4, atol=1e-6)
    assert_all_finite(value, grads)


@pytest.mark.parametrize("batch", GENERIC)
def test_gradient_matches_finite_differences(batch):
    x, y = BATCHES[batch]
    _, (grad,) = value_and_grads(lifted_structure_loss, x, y)
    eps = 1e-3
    numeric = np.zeros_like(x, dtype=np.float64)
    for idx in np.ndindex(*x.shape):
        hi, lo = x.astype(np.float64).copy(), x.astype(np.float64).copy()
        hi[idx] += eps
        lo[idx] -= eps
        numeric[idx] = (reference_lifted(hi, y) - reference_lifted(lo, y)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=2e-3, rtol=2e-2)


def test_layer_config():
    assert LiftedStructureLoss.from_config(LiftedStructureLoss(margin=0.7).get_config()).margin == 0.7
