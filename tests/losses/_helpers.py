"""Shared fixtures-as-data of the loss tests: hand-made batches and small utilities.

The reference implementations live in each test file (loops written from the
papers' definitions); this module only holds inputs and plumbing.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import detreg_keras  # noqa: F401  (selects the TensorFlow backend)


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def make_batches() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Small hand-made batches ``name -> (embeddings float32 [B, D], labels int32 [B])``.

    * ``mixed``: random vectors; class 2 has a single sample, labels are sparse.
    * ``ties``: exact duplicates inside a class and across classes, antipodal
      points, a zero vector; several exactly equal distances.
    * ``absent``: labels 1, 4, 6 only (classes 0, 2, 3, 5, 7 absent); class 6 single.
    * ``singletons``: every class has one sample (no positive pair).
    * ``one_class``: a single class (no negative pair).
    """
    rng = np.random.default_rng(1234)
    e1, e2, e3 = np.eye(3)
    ties = np.stack([e1, e1, e2, e2, -e1, e3, e3, (e1 + e2) / np.sqrt(2.0), np.zeros(3)])
    return {
        "mixed": (rng.normal(size=(10, 6)).astype(np.float32), np.array([0, 0, 0, 1, 1, 2, 3, 3, 5, 5], np.int32)),
        "ties": (ties.astype(np.float32), np.array([0, 0, 1, 2, 1, 2, 3, 1, 3], np.int32)),
        "absent": (rng.normal(size=(7, 5)).astype(np.float32), np.array([4, 1, 4, 1, 6, 4, 1], np.int32)),
        "singletons": (rng.normal(size=(5, 4)).astype(np.float32), np.array([0, 1, 2, 3, 4], np.int32)),
        "one_class": (rng.normal(size=(5, 4)).astype(np.float32), np.array([2, 2, 2, 2, 2], np.int32)),
    }


BATCHES = make_batches()
#: Batches without any zero vector or cross-class duplicate: every loss is smooth there.
GENERIC = ("mixed", "absent", "singletons", "one_class")


def normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float64 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(norms > 0, x / np.maximum(norms, 1e-300), 0.0)


def value_and_grads(fn, embeddings, labels, *weights):
    """Evaluate ``fn(emb, labels, *weights)`` eagerly; return (value, [d/d emb, d/d weights...])."""
    variables = [tf.Variable(np.asarray(embeddings, np.float32))] + [
        tf.Variable(np.asarray(w, np.float32)) for w in weights
    ]
    with tf.GradientTape() as tape:
        value = fn(variables[0], tf.constant(labels), *variables[1:])
    grads = tape.gradient(value, variables)
    grads = [np.zeros(v.shape, np.float32) if g is None else np.asarray(g) for g, v in zip(grads, variables)]
    return float(value), grads


def assert_all_finite(value, grads):
    assert np.isfinite(value), value
    for g in grads:
        assert np.all(np.isfinite(g)), g


def random_proxies(num: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(num, dim)).astype(np.float32)


def train_one_step(loss_name: str, loss_config: dict | None = None, expected_weight: str | None = None) -> None:
    """``DRegModel(loss=loss_name)`` on tiny image data: one ``fit`` step, finite logs, the loss's weights move."""
    import keras

    from detreg_keras.model import DRegModel
    from detreg_keras.optim import make_optimizer

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 4).astype("int32")
    images = rng.uniform(0, 80, (16, 8, 8, 1)).astype("float32") + (labels[:, None, None, None] * 40.0)
    model = DRegModel(
        num_classes=4,
        backbone="small_cnn",
        image_size=8,
        channels=1,
        embedding_dim=16,
        num_couplings=2,
        hidden_units=16,
        loss=loss_name,
        loss_config=loss_config or {},
    )
    model.compile(optimizer=make_optimizer(learning_rate=1e-2, head_lr_multiplier=1.0))
    model(images[:2])
    before = [w.numpy().copy() for w in model.loss_min.trainable_weights]
    history = model.fit(
        images, labels, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=[keras.callbacks.TerminateOnNaN()]
    )
    logs = history.history
    assert model.loss_min.metric_name in logs, sorted(logs)
    assert all(np.isfinite(v).all() for v in logs.values()), logs
    if expected_weight is not None:
        names = [w.path.split("/")[-1] for w in model.loss_min.trainable_weights]
        assert names == [expected_weight], names
        after = [w.numpy() for w in model.loss_min.trainable_weights]
        assert any(not np.allclose(b, a) for b, a in zip(before, after)), "the loss's weights did not train"
