"""Circle loss against a double loop over (negative, positive) pairs of Sun et al."""

from __future__ import annotations

import numpy as np
import pytest

from detreg_keras.losses.circle import CircleLoss, circle_loss

from ._helpers import BATCHES, assert_all_finite, normalize, value_and_grads


def reference_circle(x, y, margin=0.4, gamma=80.0):
    x = normalize(x)
    b = len(y)
    losses = []
    for a in range(b):
        sp = [x[a] @ x[p] for p in range(b) if p != a and y[p] == y[a]]
        sn = [x[a] @ x[n] for n in range(b) if y[n] != y[a]]
        if not sp or not sn:
            continue
        total = 0.0
        for s_n in sn:
            for s_p in sp:
                alpha_n = max(s_n + margin, 0.0)  # [s_n - O_n]_+, O_n = -m
                alpha_p = max(1 + margin - s_p, 0.0)  # [O_p - s_p]_+, O_p = 1 + m
                total += np.exp(gamma * (alpha_n * (s_n - margin) - alpha_p * (s_p - (1 - margin))))
        losses.append(np.log1p(total))
    return float(np.mean(losses)) if losses else 0.0


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("margin,gamma", [(0.4, 80.0), (0.25, 32.0)])
def test_matches_reference(batch, margin, gamma):
    x, y = BATCHES[batch]
    value, grads = value_and_grads(lambda e, l: circle_loss(e, l, margin=margin, gamma=gamma), x, y)
    np.testing.assert_allclose(value, reference_circle(x, y, margin, gamma), rtol=1e-4, atol=1e-5)
    assert_all_finite(value, grads)


def test_face_recognition_setting_is_stable():
    x, y = BATCHES["ties"]  # antipodal points: exponents of several hundred
    value, grads = value_and_grads(lambda e, l: circle_loss(e, l, margin=0.25, gamma=256.0), x, y)
    assert_all_finite(value, grads)
    assert value > 100.0


def test_layer_config():
    clone = CircleLoss.from_config(CircleLoss(margin=0.25, gamma=256.0).get_config())
    assert (clone.margin, clone.gamma) == (0.25, 256.0)
