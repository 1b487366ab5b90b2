"""Multi-class N-pair loss against a loop reference of Sohn's multi-class N-pair loss on the PML pair reduction."""

from __future__ import annotations

import numpy as np
import pytest

from detreg_keras.losses.npair import NPairLoss, npair_loss

from ._helpers import BATCHES, assert_all_finite, normalize, value_and_grads


def reference_npair(x, y, scale=1.0):
    x = normalize(x)
    seen: dict[int, list[int]] = {}
    for i, label in enumerate(y):
        seen.setdefault(int(label), []).append(i)
    pairs = [(idx[0], idx[1]) for idx in seen.values() if len(idx) >= 2]  # first two occurrences
    if not pairs:
        return 0.0
    total = 0.0
    for i, (anchor, positive) in enumerate(pairs):
        own = scale * x[anchor] @ x[positive]
        others = [scale * x[anchor] @ x[p] for j, (_, p) in enumerate(pairs) if j != i]
        total += np.log1p(sum(np.exp(o - own) for o in others))  # log(1 + Σ_{j≠i} exp(f fj+ - f fi+))
    return total / len(pairs)


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_matches_reference(batch, scale):
    x, y = BATCHES[batch]
    value, grads = value_and_grads(lambda e, l: npair_loss(e, l, scale=scale), x, y)
    np.testing.assert_allclose(value, reference_npair(x, y, scale), rtol=1e-4, atol=1e-6)
    assert_all_finite(value, grads)


def test_extra_samples_beyond_the_pair_are_ignored():
    x, y = BATCHES["mixed"]
    # class 0 has samples 0, 1, 2: moving sample 2 must not change the loss.
    moved = x.copy()
    moved[2] = -moved[2] * 3.0
    np.testing.assert_allclose(float(npair_loss(moved, y)), float(npair_loss(x, y)), rtol=1e-6)


def test_layer_config():
    layer = NPairLoss(scale=4.0)
    assert NPairLoss.from_config(layer.get_config()).scale == 4.0
