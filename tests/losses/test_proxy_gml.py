"""ProxyGML against a loop transcription of the official forward pass (Zhu et al., NeurIPS 2020)."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from detreg_keras import losses
from detreg_keras.losses.proxy_gml import ProxyGMLLoss, proxy_gml_loss, subgraph_size

from ._helpers import BATCHES, assert_all_finite, normalize, random_proxies, train_one_step, value_and_grads


def reference_proxy_gml(x, y, proxies, n, r, lam):
    """Official ProxyGML.forward with loops, float64, with its 1e-8 / 1e-20 epsilons and its logits != 0 mask."""
    x = normalize(x)
    w = normalize(proxies)
    total = len(w)
    num_classes = total // n
    proxy_class = [j // n for j in range(total)]
    k = math.ceil(r * num_classes * n)
    cls = 0.0
    for i in range(len(x)):
        sim = [float(x[i] @ w[j]) for j in range(total)]
        score = [sim[j] + 1000.0 * (proxy_class[j] == y[i]) for j in range(total)]
        kept = sorted(range(total), key=lambda j: -score[j])[:k]
        logits = [sum(sim[j] for j in kept if proxy_class[j] == c) for c in range(num_classes)]
        exps = [math.exp(z) if z != 0.0 else 0.0 for z in logits]
        predict = exps[y[i]] / (1e-8 + sum(exps))
        cls += -math.log(predict + 1e-20)
    cls /= len(x)
    if not lam:
        return cls
    reg = 0.0
    for j in range(total):
        u = [sum(float(w[j] @ w[l]) for l in range(total) if proxy_class[l] == c) for c in range(num_classes)]
        top = max(u)
        reg += -(u[proxy_class[j]] - top - math.log(sum(math.exp(v - top) for v in u)))
    return cls + lam * reg / total


@pytest.mark.parametrize("batch", ["mixed", "absent", "singletons", "one_class"])
@pytest.mark.parametrize("n,r,lam", [(3, 0.3, 0.3), (5, 0.05, 0.0), (1, 1.0, 0.5), (4, 0.2, 0.3)])
def test_matches_official_loop_reference(batch, n, r, lam):
    x, y = BATCHES[batch]
    num_classes = 7
    proxies = random_proxies(num_classes * n, x.shape[1], seed=n)
    value, grads = value_and_grads(
        lambda e, l, p: proxy_gml_loss(e, l, p, proxies_per_class=n, r=r, weight_lambda=lam), x, y, proxies
    )
    np.testing.assert_allclose(value, reference_proxy_gml(x, y, proxies, n, r, lam), rtol=1e-5, atol=1e-6)
    assert_all_finite(value, grads)


def test_realistic_size_matches_reference():
    rng = np.random.default_rng(0)
    num_classes, n, dim = 100, 12, 128
    y = np.repeat(rng.choice(num_classes, 16, replace=False), 4).astype(np.int32)  # B = 64, 4 per class
    x = rng.normal(size=(64, dim)).astype(np.float32)
    proxies = random_proxies(num_classes * n, dim, seed=1)
    value, grads = value_and_grads(lambda e, l, p: proxy_gml_loss(e, l, p, proxies_per_class=n), x, y, proxies)
    np.testing.assert_allclose(value, reference_proxy_gml(x, y, proxies, n, 0.05, 0.3), rtol=1e-5)
    assert_all_finite(value, grads)
    assert subgraph_size(num_classes, n, 0.05) == 60


def test_subgraph_keeps_positive_proxies_first():
    # k < N: the sample keeps only its own class's proxies, so the loss is log(1) = 0 (regulariser off)
    x = np.array([[1.0, 0.0]], np.float32)
    proxies = np.array([[0, 1], [0.1, 1], [1, 0], [1, 0.1]], np.float32)  # class 0 far, class 1 near
    assert subgraph_size(2, 2, 0.5) == 2
    assert float(proxy_gml_loss(x, [0], proxies, proxies_per_class=2, r=0.5, weight_lambda=0.0)) == 0.0
    # k = all: class 1's similarities (~1 each) dominate class 0's (~0.1): loss ~ log(1 + e^{2 - 0.1})
    full = float(proxy_gml_loss(x, [0], proxies, proxies_per_class=2, r=1.0, weight_lambda=0.0))
    assert full > 1.5


def test_layer_owns_proxies_and_round_trips():
    layer = losses.get("proxy_gml", num_classes=10, embedding_dim=8, proxies_per_class=3, r=0.2, weight_lambda=0.1)
    assert isinstance(layer, ProxyGMLLoss) and layer.has_proxies
    layer.build(None)
    proxies = layer.proxies.numpy()
    assert proxies.shape == (30, 8) and np.abs(proxies).max() <= 1 / math.sqrt(30)
    x = np.random.default_rng(2).normal(size=(6, 8)).astype(np.float32)
    y = np.array([0, 0, 3, 3, 9, 9], np.int32)
    np.testing.assert_allclose(float(layer(x, y)), reference_proxy_gml(x, y, proxies, 3, 0.2, 0.1), rtol=1e-5)
    clone = ProxyGMLLoss.from_config(layer.get_config())
    clone.build(None)
    clone.set_weights(layer.get_weights())
    assert float(clone(x, y)) == pytest.approx(float(layer(x, y)), rel=1e-6)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert restored.get_config() == layer.get_config()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="proxies_per_class >= 1"):
        ProxyGMLLoss(num_classes=3, embedding_dim=4, proxies_per_class=0)
    with pytest.raises(ValueError, match="0 < r <= 1"):
        ProxyGMLLoss(num_classes=3, embedding_dim=4, r=0.0)
    with pytest.raises(ValueError, match="0 < r <= 1"):
        ProxyGMLLoss(num_classes=3, embedding_dim=4, r=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        ProxyGMLLoss(num_classes=0, embedding_dim=4)
    with pytest.raises(ValueError, match="proxies_per_class >= 1"):
        proxy_gml_loss(np.ones((2, 4), np.float32), [0, 1], np.ones((4, 4), np.float32), proxies_per_class=0)
    with pytest.raises(ValueError, match="divisible"):
        proxy_gml_loss(np.ones((2, 4), np.float32), [0, 1], np.ones((5, 4), np.float32), proxies_per_class=2)


def test_dreg_model_trains_a_step_with_proxy_gml():
    train_one_step("proxy_gml", {"proxies_per_class": 3, "r": 0.5}, expected_weight="proxies")
