"""Property-based tests (hypothesis) of the losses, the regulariser and the retrieval metrics."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detreg_keras.losses import proxy_anchor_loss
from detreg_keras.metrics import (
    METRIC_ALIASES,
    METRIC_NAMES,
    evaluate_embeddings,
    metric_keys,
)
from detreg_keras.regularizers import per_sample_regularizer

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def batches(draw, min_batch=2, max_batch=24):
    batch = draw(st.integers(min_batch, max_batch))
    dim = draw(st.integers(2, 16))
    num_classes = draw(st.integers(2, 10))
    labels = draw(st.lists(st.integers(0, num_classes - 1), min_size=batch, max_size=batch))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((batch, dim)) * scale).astype("float32")
    proxies = rng.standard_normal((num_classes, dim)).astype("float32")
    return x, np.asarray(labels, "int32"), proxies


@SETTINGS
@given(batches(), st.floats(0.0, 0.5), st.floats(1.0, 64.0))
def test_proxy_anchor_is_finite_non_negative_with_finite_gradients(batch, margin, alpha):
    x, labels, proxies = batch
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = proxy_anchor_loss(xt, labels, proxies, margin=margin, alpha=alpha)
    assert np.isfinite(loss.numpy()) and loss.numpy() >= 0.0
    assert np.all(np.isfinite(tape.gradient(loss, xt).numpy()))
    # invariant to the scale of the embeddings (cosine similarities)
    scaled = proxy_anchor_loss(tf.constant(x * 3.0), labels, proxies, margin=margin, alpha=alpha)
    np.testing.assert_allclose(scaled.numpy(), loss.numpy(), rtol=1e-4, atol=1e-4)


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 4), st.integers(2, 12), st.integers(0, 2**31 - 1))
def test_regularizer_forms_are_ordered_and_finite(batch, blocks, dim, seed):
    log_diag = tf.constant(np.random.default_rng(seed).standard_normal((batch, blocks, dim)) * 5, tf.float32)
    log1p = per_sample_regularizer(log_diag, "log1p").numpy()
    logdet = per_sample_regularizer(log_diag, "logdet").numpy()
    assert np.all(np.isfinite(log1p)) and np.all(log1p > 0)
    assert np.all(log1p >= logdet - 1e-5)  # log(1 + |J|) > log|J|


@SETTINGS
@given(batches(min_batch=4, max_batch=40))
def test_retrieval_metrics_are_bounded_and_recall_is_monotone_in_k(batch):
    x, labels, _ = batch
    ks = (1, 2, 3)
    metrics = evaluate_embeddings(x, labels, ks=ks, metrics=("recall", "map@r", "precision@1"))
    recalls = [metrics[f"recall@{k}"] for k in ks]
    assert all(0.0 <= r <= 1.0 for r in recalls)
    assert recalls == sorted(recalls)
    assert 0.0 <= metrics["map@r"] <= 1.0 and 0.0 <= metrics["precision@1"] <= 1.0


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 13), st.integers(2, 12), st.integers(0, 2**31 - 1), st.sampled_from(["log1p", "logdet"]))
def test_mean_coupling_reduction_is_the_sum_over_k(batch, blocks, dim, seed, form):
    log_diag = tf.constant(np.random.default_rng(seed).standard_normal((batch, blocks, dim)) * 3, tf.float64)
    total = per_sample_regularizer(log_diag, form, coupling_reduction="sum").numpy()
    mean = per_sample_regularizer(log_diag, form, coupling_reduction="mean").numpy()
    np.testing.assert_allclose(mean * blocks, total, rtol=1e-12, atol=1e-12)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches(min_batch=4, max_batch=30),
    st.lists(st.sampled_from(METRIC_NAMES + tuple(METRIC_ALIASES)), min_size=1, max_size=5),
)
def test_the_keys_returned_are_the_keys_requested(batch, requested):
    x, labels, _ = batch
    got = evaluate_embeddings(x, labels, ks=(1, 2), metrics=requested)
    assert list(got) == metric_keys((1, 2), requested)
    assert all(0.0 <= v <= 1.0 for v in got.values())
