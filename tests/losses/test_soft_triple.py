"""SoftTriple loss against a loop reference of Qian et al. (official regulariser)."""

from __future__ import annotations

import numpy as np
import pytest

from detreg_keras.losses.soft_triple import SoftTripleLoss, soft_triple_loss

from ._helpers import BATCHES, assert_all_finite, normalize, random_proxies, value_and_grads

NUM_CLASSES = 7


def reference_soft_triple(x, y, centers, num_centers, la=20.0, gamma=0.1, tau=0.2, margin=0.01):
    x, centers = normalize(x), normalize(centers)
    num_classes = len(centers) // num_centers
    losses = []
    for i, label in enumerate(y):
        logits = []
        for c in range(num_classes):
            sims = np.array([x[i] @ centers[c * num_centers + k] for k in range(num_centers)])
            weights = np.exp(sims / gamma) / np.sum(np.exp(sims / gamma))  # soft center assignment
            relaxed = float(np.sum(weights * sims))
            logits.append(la * (relaxed - (margin if c == label else 0.0)))  # margin on the true class
        logits = np.array(logits)
        losses.append(-(logits[label] - np.log(np.sum(np.exp(logits)))))
    loss = float(np.mean(losses))
    if tau > 0 and num_centers > 1:
        reg = 0.0
        for c in range(num_classes):
            for k in range(num_centers):
                for k2 in range(k + 1, num_centers):
                    w, w2 = centers[c * num_centers + k], centers[c * num_centers + k2]
                    reg += np.sqrt(2.0 + 1e-5 - 2.0 * (w @ w2))
        loss += tau * reg / (num_classes * num_centers * (num_centers - 1))
    return loss


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize(
    "params", [{"num_centers": 10}, {"num_centers": 3, "la": 5.0, "gamma": 0.5, "tau": 1.0, "margin": 0.2}]
)
def test_matches_reference(batch, params):
    x, y = BATCHES[batch]
    centers = random_proxies(NUM_CLASSES * params["num_centers"], x.shape[1])
    value, grads = value_and_grads(lambda e, l, p: soft_triple_loss(e, l, p, **params), x, y, centers)
    np.testing.assert_allclose(value, reference_soft_triple(x, y, centers, **params), rtol=1e-4, atol=1e-5)
    assert_all_finite(value, grads)


def test_single_center_and_coincident_centers():
    x, y = BATCHES["mixed"]
    one = random_proxies(NUM_CLASSES, x.shape[1])
    value = float(soft_triple_loss(x, y, one, num_centers=1))
    np.testing.assert_allclose(value, reference_soft_triple(x, y, one, num_centers=1), rtol=1e-4)
    # all K centers of a class identical: the regulariser's sqrt sits at its 1e-5 floor, gradient finite.
    same = np.repeat(one, 4, axis=0)
    value, grads = value_and_grads(lambda e, l, p: soft_triple_loss(e, l, p, num_centers=4), x, y, same)
    np.testing.assert_allclose(value, reference_soft_triple(x, y, same, num_centers=4), rtol=1e-4)
    assert_all_finite(value, grads)


def test_layer_weight_shape_and_config():
    layer = SoftTripleLoss(num_classes=5, embedding_dim=4, num_centers=3, la=10.0, gamma=0.2, tau=0.0, margin=0.05)
    layer.build()
    assert tuple(layer.proxies.shape) == (15, 4) and layer.proxies.path.endswith("proxies")
    bound = 1.0 / np.sqrt(15)
    assert np.all(np.abs(layer.proxies.numpy()) <= bound)
    config = layer.get_config()
    assert {k: config[k] for k in ("num_centers", "la", "gamma", "tau", "margin")} == {
        "num_centers": 3,
        "la": 10.0,
        "gamma": 0.2,
        "tau": 0.0,
        "margin": 0.05,
    }
