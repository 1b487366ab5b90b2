"""Normalized softmax, CosFace and ArcFace against per-sample loop references (ArcFace via arccos)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detreg_keras.losses.margin_softmax import (
    ArcFaceLoss,
    CosFaceLoss,
    NormalizedSoftmaxLoss,
    arcface_loss,
    cosface_loss,
    normalized_softmax_loss,
)

from ._helpers import BATCHES, assert_all_finite, normalize, random_proxies, value_and_grads

NUM_CLASSES = 7


def _ce(logits, label):
    logits = np.asarray(logits, np.float64)
    top = logits.max()
    return -(logits[label] - top - np.log(np.sum(np.exp(logits - top))))


def reference(kind, x, y, w, **params):
    x, w = normalize(x), normalize(w)
    losses = []
    for i, label in enumerate(y):
        cos = [float(np.clip(x[i] @ w[c], -1.0, 1.0)) for c in range(len(w))]
        if kind == "normalized_softmax":
            logits = [c / params.get("temperature", 0.05) for c in cos]
        elif kind == "cosface":
            s, m = params.get("scale", 64.0), params.get("margin", 0.35)
            logits = [s * (c - (m if k == label else 0.0)) for k, c in enumerate(cos)]
        else:
            s, m = params.get("scale", 64.0), params.get("margin", 0.5)
            theta = math.acos(cos[label])
            # insightface: cos(θ + m) while θ + m < π, else the linear fallback cos θ - m sin m.
            target = math.cos(theta + m) if theta + m < math.pi else cos[label] - m * math.sin(m)
            logits = [s * (target if k == label else c) for k, c in enumerate(cos)]
        losses.append(_ce(logits, label))
    return float(np.mean(losses))


FUNCTIONS = {"normalized_softmax": normalized_softmax_loss, "cosface": cosface_loss, "arcface": arcface_loss}
PARAMS = {
    "normalized_softmax": [{}, {"temperature": 0.5}],
    "cosface": [{}, {"scale": 10.0, "margin": 0.2}],
    "arcface": [{}, {"scale": 10.0, "margin": 0.3}],
}
CASES = [(kind, params) for kind, options in PARAMS.items() for params in options]


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("kind,params", CASES)
def test_matches_reference(batch, kind, params):
    x, y = BATCHES[batch]
    w = random_proxies(NUM_CLASSES, x.shape[1], seed=3)
    value, grads = value_and_grads(lambda e, l, p: FUNCTIONS[kind](e, l, p, **params), x, y, w)
    np.testing.assert_allclose(value, reference(kind, x, y, w, **params), rtol=2e-4, atol=1e-4)
    assert_all_finite(value, grads)


def test_arcface_fallback_region_and_exact_alignment():
    # sample 0 sits exactly on its class weight (θ = 0: arccos' gradient would be infinite);
    # sample 1 is nearly opposite its class weight (θ + m > π: the fallback branch).
    w = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    x = np.array([[1.0, 0.0], [0.05, -1.0]], np.float32)
    y = np.array([0, 1])
    value, grads = value_and_grads(lambda e, l, p: arcface_loss(e, l, p, scale=8.0), x, y, w)
    assert_all_finite(value, grads)
    np.testing.assert_allclose(value, reference("arcface", x, y, w, scale=8.0), rtol=1e-3)


@pytest.mark.parametrize("cls", [NormalizedSoftmaxLoss, CosFaceLoss, ArcFaceLoss])
def test_layer_weight_is_named_proxies(cls):
    layer = cls(num_classes=NUM_CLASSES, embedding_dim=6)
    layer(*BATCHES["mixed"])
    assert cls.has_proxies
    assert [v.path.split("/")[-1] for v in layer.trainable_weights] == ["proxies"]
    assert tuple(layer.proxies.shape) == (NUM_CLASSES, 6)
