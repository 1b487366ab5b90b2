"""Proxy Anchor against an independent numpy transcription of the official formula."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from detreg_keras.losses import ProxyAnchorLoss, get, proxy_anchor_loss


def _numpy_proxy_anchor(x, labels, proxies, mrg=0.1, alpha=32.0):
    """Official Proxy_Anchor.forward (Kim et al. 2020), written with loops in float64."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    p = proxies / np.linalg.norm(proxies, axis=1, keepdims=True)
    cos = x @ p.T
    num_classes = p.shape[0]
    pos_sum, neg_sum, valid = 0.0, 0.0, 0
    for c in range(num_classes):
        pos = [np.exp(-alpha * (cos[i, c] - mrg)) for i in range(len(x)) if labels[i] == c]
        neg = [np.exp(alpha * (cos[i, c] + mrg)) for i in range(len(x)) if labels[i] != c]
        if pos:
            valid += 1
            pos_sum += np.log(1 + np.sum(pos))
        neg_sum += np.log(1 + np.sum(neg))
    return pos_sum / valid + neg_sum / num_classes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_reference_with_absent_classes(seed):
    rng = np.random.default_rng(seed)
    num_classes, dim = 9, 6
    labels = rng.choice([0, 2, 3, 7], size=12)  # classes 1, 4, 5, 6, 8 absent from the batch
    labels[0] = 8  # ... but one singleton class present
    x = rng.standard_normal((12, dim))
    proxies = rng.standard_normal((num_classes, dim))
    ours = proxy_anchor_loss(tf.constant(x, tf.float32), tf.constant(labels), tf.constant(proxies, tf.float32))
    np.testing.assert_allclose(ours.numpy(), _numpy_proxy_anchor(x, labels, proxies), rtol=1e-5, atol=1e-5)


def test_hyper_parameters_and_stable_extremes():
    rng = np.random.default_rng(3)
    x, proxies = rng.standard_normal((5, 4)), rng.standard_normal((3, 4))
    labels = np.array([0, 0, 1, 2, 2])
    for mrg, alpha in ((0.0, 1.0), (0.3, 64.0)):
        ours = proxy_anchor_loss(x.astype("float32"), labels, proxies.astype("float32"), margin=mrg, alpha=alpha)
        np.testing.assert_allclose(ours.numpy(), _numpy_proxy_anchor(x, labels, proxies, mrg, alpha), rtol=1e-5)
    # alpha large enough to overflow exp in float32: the logsumexp form stays finite
    xt = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = proxy_anchor_loss(xt, labels, proxies.astype("float32"), alpha=1000.0)
    assert np.isfinite(loss.numpy()) and np.all(np.isfinite(tape.gradient(loss, xt).numpy()))


def test_layer_wrapper_owns_proxies_initialised_like_official_code():
    layer = get("proxy_anchor", num_classes=200, embedding_dim=512)
    assert isinstance(layer, ProxyAnchorLoss) and layer.has_proxies and layer.metric_name == "pa_loss"
    layer.build()
    proxies = layer.proxies.numpy()
    assert proxies.shape == (200, 512)
    # kaiming_normal_(mode="fan_out") on a [C, D] tensor: std = sqrt(2 / C)
    np.testing.assert_allclose(proxies.std(), np.sqrt(2 / 200), rtol=0.05)
    x = np.random.default_rng(4).standard_normal((8, 512)).astype("float32")
    labels = np.arange(8)
    np.testing.assert_allclose(
        layer(x, labels).numpy(), _numpy_proxy_anchor(x, labels, proxies.astype("float64")), rtol=1e-5
    )
    clone = ProxyAnchorLoss.from_config(layer.get_config())
    clone.build()
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(clone(x, labels).numpy(), layer(x, labels).numpy(), rtol=1e-6)


def test_gradient_pulls_positive_proxy_closer():
    x = tf.Variable([[1.0, 0.0]])
    proxies = tf.constant([[0.0, 1.0], [-1.0, 0.0]])
    with tf.GradientTape() as tape:
        loss = proxy_anchor_loss(x, tf.constant([0]), proxies)
    grad = tape.gradient(loss, x).numpy()
    assert grad[0, 1] < 0  # descending the gradient increases the component towards proxy 0


def test_bad_construction():
    with pytest.raises(ValueError, match="num_classes"):
        ProxyAnchorLoss(num_classes=0, embedding_dim=4)
    with pytest.raises(ValueError, match="embedding_dim"):
        ProxyAnchorLoss(num_classes=3, embedding_dim=None)
    with pytest.raises(ValueError, match="Unknown loss"):
        get("proxy_banana", num_classes=3, embedding_dim=4)
