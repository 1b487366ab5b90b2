"""ProxyNCA and ProxyNCA++ against per-sample loop references of their papers' ratios."""

from __future__ import annotations

import numpy as np
import pytest

from detreg_keras.losses.proxy_nca import ProxyNCALoss, ProxyNCAPlusPlusLoss, proxy_nca_loss, proxy_nca_pp_loss

from ._helpers import BATCHES, assert_all_finite, normalize, random_proxies, value_and_grads

NUM_CLASSES = 7  # batches use labels up to 6; several classes are absent from each batch


def _sq_dist(x, p):
    return float(np.sum((x - p) ** 2))


def reference_proxy_nca(x, y, proxies, scale=1.0):
    x, proxies = normalize(x), normalize(proxies)
    losses = []
    for i, label in enumerate(y):
        num = np.exp(-scale * _sq_dist(x[i], proxies[label]))
        den = sum(np.exp(-scale * _sq_dist(x[i], proxies[z])) for z in range(len(proxies)) if z != label)
        losses.append(-np.log(num / den))  # Movshovitz-Attias et al.: positive not in the denominator
    return float(np.mean(losses))


def reference_proxy_nca_pp(x, y, proxies, temperature=1.0 / 9.0):
    x, proxies = normalize(x), normalize(proxies)
    losses = []
    for i, label in enumerate(y):
        logits = [-_sq_dist(x[i], proxies[z]) / temperature for z in range(len(proxies))]
        losses.append(-(logits[label] - np.log(np.sum(np.exp(logits)))))
    return float(np.mean(losses))


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("scale", [1.0, 9.0])
def test_proxy_nca_matches_reference(batch, scale):
    x, y = BATCHES[batch]
    proxies = random_proxies(NUM_CLASSES, x.shape[1])
    value, grads = value_and_grads(lambda e, l, p: proxy_nca_loss(e, l, p, scale=scale), x, y, proxies)
    np.testing.assert_allclose(value, reference_proxy_nca(x, y, proxies, scale), rtol=1e-4, atol=1e-5)
    assert_all_finite(value, grads)
    absent = sorted(set(range(NUM_CLASSES)) - set(y.tolist()))
    assert np.any(grads[1][absent] != 0)  # absent classes still act as negatives


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("temperature", [1.0 / 9.0, 0.5])
def test_proxy_nca_pp_matches_reference(batch, temperature):
    x, y = BATCHES[batch]
    proxies = random_proxies(NUM_CLASSES, x.shape[1], seed=1)
    value, grads = value_and_grads(lambda e, l, p: proxy_nca_pp_loss(e, l, p, temperature=temperature), x, y, proxies)
    np.testing.assert_allclose(value, reference_proxy_nca_pp(x, y, proxies, temperature), rtol=1e-4, atol=1e-5)
    assert_all_finite(value, grads)


def test_single_proxy_is_finite():
    x, y = BATCHES["one_class"]
    proxies = random_proxies(3, x.shape[1])[:1]
    value, grads = value_and_grads(proxy_nca_loss, x, np.zeros_like(y), proxies)
    assert value == 0.0
    assert_all_finite(value, grads)


@pytest.mark.parametrize("cls", [ProxyNCALoss, ProxyNCAPlusPlusLoss])
def test_layer_owns_proxies(cls):
    layer = cls(num_classes=NUM_CLASSES, embedding_dim=6)
    x, y = BATCHES["mixed"]
    layer(x, y)
    assert cls.has_proxies
    assert [w.path.split("/")[-1] for w in layer.trainable_weights] == ["proxies"]
    assert tuple(layer.proxies.shape) == (NUM_CLASSES, 6)
    with pytest.raises(ValueError, match="num_classes"):
        cls(num_classes=None, embedding_dim=6)
