"""RS@k surrogate and SiMix against a loop reference of Patel et al.; chunked == unchunked."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy.special import expit

from detreg_keras.losses.recall_at_k import RecallAtKLoss, recall_at_k_loss, simix_mixing_matrix

from ._helpers import BATCHES, GENERIC, assert_all_finite, normalize, value_and_grads

K_VALUES = (1, 2, 4, 8, 16)


def reference_rsk(x, y, k_values=K_VALUES, tau1=1.0, tau2=0.01):
    """Loop form: x are already the (possibly virtual) embeddings; similarities are dot products."""
    n = len(y)
    losses = []
    for q in range(n):
        positives = [p for p in range(n) if p != q and y[p] == y[q]]
        if not positives:
            continue
        sim = [x[q] @ x[z] for z in range(n)]
        recalls = []
        for k in k_values:
            soft_hits = 0.0
            for p in positives:
                rank = 1.0 + sum(expit((sim[z] - sim[p]) / tau2) for z in range(n) if z not in (q, p))  # smoothed rank
                soft_hits += expit((k - rank) / tau1)  # smoothed hit
            recalls.append(min(soft_hits, k) / min(k, len(positives)))
        losses.append(1.0 - np.mean(recalls))
    return float(np.mean(losses)) if losses else 0.0


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("params", [{}, {"k_values": (1, 3), "tau1": 0.5, "tau2": 0.1}])
def test_matches_reference(batch, params):
    x, y = BATCHES[batch]
    value, grads = value_and_grads(lambda e, l: recall_at_k_loss(e, l, **params), x, y)
    np.testing.assert_allclose(value, reference_rsk(normalize(x), y, **params), rtol=1e-4, atol=1e-5)
    assert_all_finite(value, grads)


def test_perfect_ranking_with_sharp_sigmoids():
    # two well separated classes of two samples: every query has its positive at rank r = 1, so
    # σ((1 - r)/τ1) = 0.5 (the surrogate is centred on the rank threshold) and σ((2 - r)/τ1) ≈ 1.
    x = np.array([[1, 0], [0.99, 0.14], [-1, 0], [-0.99, 0.14]], np.float32)
    y = np.array([0, 0, 1, 1])
    value = float(recall_at_k_loss(x, y, k_values=(1, 2), tau1=0.01, tau2=0.001))
    assert value == pytest.approx(1.0 - (0.5 + 1.0) / 2, abs=1e-4)
    # labels 0, 1, 1, 0: queries 0 and 2 find their positive at rank 2 (R_1 = 0, R_2 = 0.5, loss 0.75),
    # queries 1 and 3 at rank 3 (R_1 = R_2 = 0, loss 1).
    value = float(recall_at_k_loss(x, np.array([0, 1, 1, 0]), k_values=(1, 2), tau1=0.01, tau2=0.001))
    assert value == pytest.approx((0.75 + 1.0 + 0.75 + 1.0) / 4, abs=1e-3)


def test_simix_mixing_matrix_structure():
    _, y = BATCHES["mixed"]
    mixing, labels = simix_mixing_matrix(y, seed=tf.constant([3, 4]))
    mixing, labels = mixing.numpy(), labels.numpy()
    b = len(y)
    np.testing.assert_array_equal(mixing[:b], np.eye(b))
    expected_pairs = {(i, j) for i in range(b) for j in range(i + 1, b) if y[i] == y[j]}
    rows = mixing[b:]
    assert len(rows) == len(expected_pairs) == 3 + 1 + 1 + 1
    seen = set()
    for row, label in zip(rows, labels[b:]):
        (i, j) = np.flatnonzero(row)
        seen.add((i, j))
        assert y[i] == y[j] == label
        assert row.sum() == pytest.approx(1.0) and 0.0 < row[i] < 1.0
    assert seen == expected_pairs


@pytest.mark.parametrize("batch", ["mixed", "ties", "absent"])
def test_simix_matches_reference_with_explicit_virtual_embeddings(batch):
    x, y = BATCHES[batch]
    seed = tf.constant([7, 11])
    value, grads = value_and_grads(lambda e, l: recall_at_k_loss(e, l, simix=True, seed=seed), x, y)
    # Same α draws: read them back from the mixing matrix, then build virtual samples explicitly.
    mixing = simix_mixing_matrix(y, seed=seed)[0].numpy()[len(y) :]
    xn = normalize(x)
    virtual, virtual_labels = [], []
    for row in mixing:
        i, j = np.flatnonzero(row)
        virtual.append(row[i] * xn[i] + row[j] * xn[j])  # not re-normalised
        virtual_labels.append(y[i])
    extended = np.concatenate([xn, np.array(virtual).reshape(-1, x.shape[1])])
    labels = np.concatenate([y, np.array(virtual_labels, dtype=y.dtype)])
    np.testing.assert_allclose(value, reference_rsk(extended, labels), rtol=1e-4, atol=1e-5)
    assert_all_finite(value, grads)


CHUNK_CASES = [(batch, chunk) for batch in ("mixed", "ties", *GENERIC[1:]) for chunk in (3, 64)] + [("mixed", 1)]


@pytest.mark.parametrize("batch,chunk_size", CHUNK_CASES)
@pytest.mark.parametrize("simix", [False, True])
def test_chunked_equals_unchunked(batch, simix, chunk_size):
    x, y = BATCHES[batch]
    seed = tf.constant([1, 2])
    full = value_and_grads(lambda e, l: recall_at_k_loss(e, l, simix=simix, seed=seed), x, y)
    chunked = value_and_grads(lambda e, l: recall_at_k_loss(e, l, simix=simix, seed=seed, chunk_size=chunk_size), x, y)
    np.testing.assert_allclose(chunked[0], full[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(chunked[1][0], full[1][0], rtol=1e-4, atol=1e-6)
    assert_all_finite(*chunked)


def test_chunked_inside_tf_function_with_dynamic_batch():
    x, y = BATCHES["mixed"]
    variable = tf.Variable(x)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)])
    def step(labels):
        with tf.GradientTape() as tape:
            loss = recall_at_k_loss(variable, labels, chunk_size=4, simix=True, seed=tf.constant([5, 6]))
        return loss, tape.gradient(loss, variable)

    loss, grad = step(tf.constant(y))
    expected = value_and_grads(lambda e, l: recall_at_k_loss(e, l, simix=True, seed=tf.constant([5, 6])), x, y)
    np.testing.assert_allclose(float(loss), expected[0], rtol=1e-5)
    np.testing.assert_allclose(grad.numpy(), expected[1][0], rtol=1e-4, atol=1e-6)


def test_chunked_compiles_with_xla():
    # Keras' jit_compile="auto" turns XLA on for GPU training: the chunk loop must keep static shapes.
    x, y = BATCHES["mixed"]

    @tf.function(jit_compile=True)
    def step(embeddings, labels):
        with tf.GradientTape() as tape:
            tape.watch(embeddings)
            loss = recall_at_k_loss(embeddings, labels, chunk_size=3)
        return loss, tape.gradient(loss, embeddings)

    loss, grad = step(tf.constant(x), tf.constant(y))
    expected = value_and_grads(recall_at_k_loss, x, y)
    np.testing.assert_allclose(float(loss), expected[0], rtol=1e-5)
    np.testing.assert_allclose(grad.numpy(), expected[1][0], rtol=1e-4, atol=1e-6)


def test_layer_seeded_simix_is_reproducible_and_config_complete():
    x, y = BATCHES["mixed"]
    kwargs = {"k_values": (1, 2, 4), "tau1": 0.5, "tau2": 0.02, "simix": True, "chunk_size": 4, "seed": 9}
    layer = RecallAtKLoss(**kwargs)
    config = layer.get_config()
    assert {k: config[k] for k in kwargs} == {**kwargs, "k_values": [1, 2, 4]}
    clone = RecallAtKLoss.from_config(config)
    np.testing.assert_allclose(float(clone(x, y)), float(layer(x, y)), rtol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        RecallAtKLoss(chunk_size=0)
