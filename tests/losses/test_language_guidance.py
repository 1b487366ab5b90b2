"""Language guidance (Roth et al. 2022) against a loop written from the definition, and its wrapper."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from detreg_keras import losses
from detreg_keras.losses.language_guidance import LanguageGuidedLoss, language_guidance_loss


def reference(x, y, table, shift=1.0, temperature=1.0):
    """T²/B Σ_i KL(P_i ‖ Q_i), one anchor and one entry at a time, float64."""
    x = np.asarray(x, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    table = np.asarray(table, np.float64)
    table = table / np.linalg.norm(table, axis=1, keepdims=True)
    b = len(y)
    total = 0.0
    for i in range(b):
        vis, lang = np.empty(b), np.empty(b)
        for j in range(b):
            if y[i] == y[j]:
                vis[j] = lang[j] = 1.0 + shift
            else:
                vis[j] = float(x[i] @ x[j])
                lang[j] = float(table[y[i]] @ table[y[j]]) + shift
        p = np.exp(lang / temperature) / np.exp(lang / temperature).sum()
        q = np.exp(vis / temperature) / np.exp(vis / temperature).sum()
        total += sum(p[j] * np.log(p[j] / q[j]) for j in range(b))
    return total * temperature**2 / b


def _batch(b, d, c, e, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, size=b)
    return rng.normal(size=(b, d)), y, rng.normal(size=(c, e))


@pytest.mark.parametrize(
    "b,d,c,e,shift,temperature",
    [(6, 4, 3, 5, 1.0, 1.0), (9, 3, 4, 2, 0.0, 0.5), (64, 128, 20, 256, 1.0, 1.0), (256, 512, 100, 64, 1.0, 0.2)],
)
def test_loss_equals_the_loop_reference(b, d, c, e, shift, temperature):
    x, y, table = _batch(b, d, c, e, seed=b)
    got = language_guidance_loss(x, y, table, shift=shift, temperature=temperature)  # computed in float32
    np.testing.assert_allclose(float(got), reference(x, y, table, shift, temperature), rtol=2e-5, atol=1e-7)


def test_gradient_equals_central_differences_of_the_reference():
    x, y, table = _batch(7, 3, 3, 4, seed=1)
    variable = tf.Variable(x.astype(np.float32))
    with tf.GradientTape() as tape:
        loss = language_guidance_loss(variable, tf.constant(y), tf.constant(table), temperature=0.5)
    grad = tape.gradient(loss, variable).numpy().astype(np.float64)
    numeric = np.zeros_like(x)
    h = 1e-6
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        numeric[idx] = (reference(up, y, table, temperature=0.5) - reference(down, y, table, temperature=0.5)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-6)  # float32 gradient, float64 differences


def test_zero_when_one_class_and_positive_otherwise():
    x, _, table = _batch(5, 4, 3, 4, seed=2)
    assert float(language_guidance_loss(x, np.zeros(5, np.int32), table)) == 0.0
    x, y, table = _batch(32, 8, 6, 8, seed=3)
    assert float(language_guidance_loss(x, y, table)) > 0.0


def test_loss_falls_when_the_visual_ordering_matches_the_language_one():
    """Embeddings equal to the class-name vectors give the language distribution itself when ``s = 0``.

    (With the default ``s = 1`` only the language side is shifted, so the minimum lies elsewhere.)
    """
    rng = np.random.default_rng(4)
    table = rng.normal(size=(8, 16))
    y = np.repeat(np.arange(8), 4)
    matched = table[y] + 0.01 * rng.normal(size=(32, 16))
    shuffled = table[rng.permutation(8)][y] + 0.01 * rng.normal(size=(32, 16))
    matched_loss = float(language_guidance_loss(matched, y, table, shift=0.0))
    assert matched_loss < 1e-3 < 0.1 * float(language_guidance_loss(shuffled, y, table, shift=0.0))


def test_wrapper_is_base_plus_weighted_term():
    names = [f"Alphabet{c % 2}/character{c:02d}" for c in range(5)]
    x, y, _ = _batch(12, 6, 5, 4, seed=5)
    x = x.astype(np.float32)
    layer = losses.get("language_guidance", num_classes=5, embedding_dim=6, class_names=names, loss="triplet",
                       loss_config={"margin": 0.3}, weight=2.5)  # fmt: skip
    base = losses.get("triplet", margin=0.3)
    expected = float(base(x, y)) + 2.5 * reference(x, y, layer.table)
    np.testing.assert_allclose(float(layer(x, y)), expected, rtol=1e-5)
    assert layer.metric_name == base.metric_name


def test_wrapper_keeps_the_proxies_of_a_proxy_base_loss_and_round_trips():
    table = np.random.default_rng(6).normal(size=(4, 3)).astype(np.float32)
    layer = LanguageGuidedLoss(num_classes=4, embedding_dim=5, loss="proxy_anchor", class_embeddings=table)
    x, y = np.random.default_rng(7).normal(size=(8, 5)).astype(np.float32), np.array([0, 0, 1, 1, 2, 2, 3, 3])
    value = float(layer(x, y))
    assert layer.has_proxies and [w.path.split("/")[-1] for w in layer.trainable_weights] == ["proxies"]
    clone = LanguageGuidedLoss.from_config(layer.get_config())
    clone.build(None)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone.table, table)
    np.testing.assert_allclose(float(clone(x, y)), value, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "needs the training class names"),
        ({"class_names": ["a", "b"]}, "2 class_names for 3 classes"),
        ({"class_embeddings": {"a": [1.0, 0.0], "b": [0.0, 1.0]}, "class_names": ["a", "b", "c"]},
         r"no text embedding for the classes \['c'\]"),
        ({"class_embeddings": np.ones((2, 4))}, "have 2 rows but there are 3 classes"),
        ({"class_embeddings": np.array([[1.0, np.nan], [1.0, 0.0], [0.0, 1.0]])}, r"non-finite values .* classes \[0\]"),
        ({"class_embeddings": "hashed_ngram", "class_names": ["a", "b", "c"], "weight": -1.0}, "weight >= 0"),
        ({"class_embeddings": "hashed_ngram", "class_names": ["a", "b", "c"], "temperature": 0.0}, "temperature > 0"),
        ({"class_embeddings": "word2vec", "class_names": ["a", "b", "c"]}, "unknown text encoder 'word2vec'"),
        ({"class_names": ["a", "b", "c"], "loss": "language_guidance"}, "cannot wrap itself"),
    ],
)  # fmt: skip
def test_bad_input_raises_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LanguageGuidedLoss(num_classes=3, embedding_dim=4, **kwargs)


def test_needs_num_classes():
    with pytest.raises(ValueError, match="num_classes >= 1"):
        LanguageGuidedLoss(num_classes=None, class_embeddings=np.eye(3))
