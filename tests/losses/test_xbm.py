"""Cross-batch memory (XBM): loss over batch + memory against float64 loops, the queue, errors, state.

The references below are written from the losses' definitions over explicit
(query, key) pairs, independently of the TensorFlow code: each query ``i`` of
the batch is paired with every other batch sample and every memory entry that
has been written so far; the memory is a plain Python list of the last ``M``
(embedding, label) pairs.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from detreg_keras import losses
from detreg_keras.losses import CrossBatchMemory, cross_batch_loss
from detreg_keras.losses.xbm import SUPPORTED_LOSSES

from ._helpers import normalize


# ------------------------------------------------------------------ references
def _pairs(q, ql, k, kl):
    """Yield ``(i, d_ij, s_ij, same)`` over the query-key pairs without self-pairs (keys start with the queries)."""
    qn, kn = normalize(q), normalize(k)
    for i in range(len(q)):
        row = []
        for j in range(len(k)):
            if j == i:
                continue
            row.append((float(np.linalg.norm(qn[i] - kn[j])), float(qn[i] @ kn[j]), bool(ql[i] == kl[j])))
        yield i, row


def _avg_nonzero(values):
    values = np.asarray(values, np.float64)
    count = int((values > 0).sum())
    return float(values.sum() / count) if count else 0.0


def ref_contrastive(q, ql, k, kl, pos_margin=0.0, neg_margin=1.0, power=1.0):
    pos, neg = [], []
    for _, row in _pairs(q, ql, k, kl):
        for d, _, same in row:
            if same:
                pos.append(max(d - pos_margin, 0.0) ** power)
            else:
                neg.append(max(neg_margin - d, 0.0) ** power)
    return _avg_nonzero(pos) + _avg_nonzero(neg)


def ref_triplet(q, ql, k, kl, margin=0.2, mining="all", squared=False):
    per = []
    for _, row in _pairs(q, ql, k, kl):
        dp = [d * d if squared else d for d, _, same in row if same]
        dn = [d * d if squared else d for d, _, same in row if not same]
        if mining == "all":
            per.extend(max(a - b + margin, 0.0) for a in dp for b in dn)
        elif dp and dn:
            per.append(max(max(dp) - min(dn) + margin, 0.0))
    if mining == "all":
        return _avg_nonzero(per)
    return float(np.mean(per)) if per else 0.0


def ref_multi_similarity(q, ql, k, kl, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
    total = 0.0
    for _, row in _pairs(q, ql, k, kl):
        sp = [s for _, s, same in row if same]
        sn = [s for _, s, same in row if not same]
        if epsilon is not None and sp and sn:
            sp, sn = [s for s in sp if s - epsilon < max(sn)], [s for s in sn if s + epsilon > min(sp)]
        if sp and sn:
            total += np.log1p(sum(np.exp(-alpha * (s - base)) for s in sp)) / alpha
            total += np.log1p(sum(np.exp(beta * (s - base)) for s in sn)) / beta
    return total / len(q)


def ref_circle(q, ql, k, kl, margin=0.4, gamma=80.0):
    per = []
    for _, row in _pairs(q, ql, k, kl):
        sp = [s for _, s, same in row if same]
        sn = [s for _, s, same in row if not same]
        if sp and sn:
            terms = [
                gamma * (max(s_n + margin, 0) * (s_n - margin) - max(1 + margin - s_p, 0) * (s_p - 1 + margin))
                for s_p in sp
                for s_n in sn
            ]
            per.append(np.logaddexp(0.0, np.logaddexp.reduce(terms)))
    return float(np.mean(per)) if per else 0.0


REFERENCES = {
    "contrastive": ref_contrastive,
    "triplet": ref_triplet,
    "multi_similarity": ref_multi_similarity,
    "circle": ref_circle,
}
CASES = [
    ("contrastive", {}),
    ("contrastive", {"pos_margin": 0.2, "neg_margin": 0.9, "power": 2.0}),
    ("triplet", {}),
    ("triplet", {"mining": "hard", "margin": 0.3}),
    ("triplet", {"mining": "all", "squared": True}),
    ("multi_similarity", {}),
    ("multi_similarity", {"epsilon": None}),
    ("circle", {}),
    ("circle", {"margin": 0.25, "gamma": 32.0}),
]


def _batches(count=5, batch=6, dim=5, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(batch, dim)).astype(np.float32), rng.integers(0, classes, batch).astype(np.int32))
        for _ in range(count)
    ]


# ---------------------------------------------------------------------- tests
def test_supported_losses_are_the_pair_losses_with_a_reference():
    assert set(SUPPORTED_LOSSES) == set(REFERENCES)
    assert type(losses.get("xbm")) is CrossBatchMemory


@pytest.mark.parametrize("name,config", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_loss_over_batch_and_memory_matches_float64_loops(name, config):
    """5 batches of 6 into a memory of 10: filling, a full queue and wrap-around (slots overwritten)."""
    layer = CrossBatchMemory(loss=name, memory_size=10, loss_config=config)
    memory: list[tuple[np.ndarray, int]] = []
    for x, y in _batches():
        keys = np.concatenate([x, np.array([e for e, _ in memory]).reshape(-1, x.shape[1])])
        key_labels = np.concatenate([y, np.array([lab for _, lab in memory], np.int32)])
        expected = REFERENCES[name](x, y, keys, key_labels, **config)
        np.testing.assert_allclose(float(layer(x, y, training=True)), expected, rtol=2e-5, atol=1e-6)
        memory = (memory + list(zip(x, y)))[-10:]


@pytest.mark.parametrize("name,config", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_empty_memory_gives_the_wrapped_batch_loss(name, config):
    """First step (nothing stored) and ``training=False`` both equal the library's own batch loss."""
    x, y = _batches(1, batch=8)[0]
    plain = float(losses.get(name, **config)(x, y))
    layer = CrossBatchMemory(loss=name, memory_size=16, loss_config=config)
    np.testing.assert_allclose(float(layer(x, y)), plain, rtol=1e-6, atol=1e-7)  # inference: batch only
    assert int(layer.filled.numpy()) == 0  # ... and nothing enqueued
    np.testing.assert_allclose(float(layer(x, y, training=True)), plain, rtol=1e-6, atol=1e-7)


def test_queue_is_a_ring_buffer_over_the_last_memory_size_samples():
    layer = CrossBatchMemory(loss="contrastive", memory_size=10)
    slots_emb, slots_lab = np.zeros((10, 5), np.float32), np.zeros(10, np.int32)
    written = 0
    for x, y in _batches(4, batch=4):
        layer(x, y, training=True)
        for row in range(len(x)):  # slot of the n-th sample ever written: n mod M
            slots_emb[written % 10], slots_lab[written % 10] = x[row], y[row]
            written += 1
        np.testing.assert_array_equal(layer.memory_embeddings.numpy(), slots_emb)
        np.testing.assert_array_equal(layer.memory_labels.numpy(), slots_lab)
        assert int(layer.filled.numpy()) == min(written, 10)
        assert int(layer.write_pointer.numpy()) == written % 10
    assert int(layer.steps.numpy()) == 4


def test_start_step_keeps_memory_out_of_the_loss_while_it_fills():
    batches = _batches(3)
    layer = CrossBatchMemory(loss="multi_similarity", memory_size=12, start_step=2)
    for step, (x, y) in enumerate(batches):
        value = float(layer(x, y, training=True))
        if step < 2:
            np.testing.assert_allclose(value, ref_multi_similarity(x, y, x, y), rtol=2e-5)
        else:  # memory = the two earlier batches
            keys = np.concatenate([x] + [b[0] for b in batches[:2]])
            key_labels = np.concatenate([y] + [b[1] for b in batches[:2]])
            np.testing.assert_allclose(value, ref_multi_similarity(x, y, keys, key_labels), rtol=2e-5)
    assert int(layer.filled.numpy()) == 12


def test_gradient_reaches_the_batch_only_and_matches_finite_differences():
    """d loss / d batch = central differences of the float64 loop with the memory held fixed."""
    (x0, y0), (x, y) = _batches(2, batch=6, dim=4, classes=3, seed=3)
    layer = CrossBatchMemory(loss="contrastive", memory_size=8, loss_config={"power": 2.0, "neg_margin": 1.5})
    layer(x0, y0, training=True)
    memory, memory_labels = layer.memory_embeddings.numpy()[:6], layer.memory_labels.numpy()[:6]
    variable = tf.Variable(x)
    with tf.GradientTape() as tape:
        value = layer(variable, y, training=True)
    grad, grad_memory = tape.gradient(value, [variable, layer.memory_embeddings])
    assert grad_memory is None

    def f(v):
        return ref_contrastive(v, y, np.concatenate([v, memory]), np.concatenate([y, memory_labels]), 0.0, 1.5, 2.0)

    base = x.astype(np.float64)
    numeric = np.zeros_like(base)
    for idx in np.ndindex(base.shape):
        step = np.zeros_like(base)
        step[idx] = 1e-5
        numeric[idx] = (f(base + step) - f(base - step)) / 2e-5
    np.testing.assert_allclose(grad.numpy(), numeric, atol=2e-4)


def test_cross_batch_loss_masks_empty_slots():
    x, y = _batches(1)[0]
    memory = np.random.default_rng(9).normal(size=(4, 5)).astype(np.float32)
    memory_labels = np.array([0, 1, 2, 3], np.int32)
    valid = np.array([True, False, True, False])
    value = float(cross_batch_loss("circle", x, y, memory, memory_labels, valid))
    keys = np.concatenate([x, memory[valid]])
    np.testing.assert_allclose(value, ref_circle(x, y, keys, np.concatenate([y, memory_labels[valid]])), rtol=2e-5)


def test_tf_function_with_dynamic_batch_matches_eager():
    batches = _batches(3)
    eager, graph = (CrossBatchMemory(loss="triplet", memory_size=12) for _ in range(2))

    @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32), tf.TensorSpec([None], tf.int32)])
    def step(embeddings, labels):
        return graph(embeddings, labels, training=True)

    for x, y in batches:
        np.testing.assert_allclose(float(step(x, y)), float(eager(x, y, training=True)), rtol=1e-6)
    np.testing.assert_array_equal(graph.memory_embeddings.numpy(), eager.memory_embeddings.numpy())


@pytest.mark.parametrize("size", [0, -4, 2.5, True, "big"])
def test_bad_memory_size_is_rejected(size):
    with pytest.raises((ValueError, TypeError), match="memory_size"):
        CrossBatchMemory(memory_size=size)


def test_batch_larger_than_memory_is_rejected_in_eager_and_in_graphs():
    x, y = _batches(1, batch=6)[0]
    with pytest.raises(ValueError, match="memory_size=4 is smaller than the \\(global\\) batch of 6"):
        CrossBatchMemory(memory_size=4)(x, y, training=True)
    layer = CrossBatchMemory(memory_size=4)

    @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32), tf.TensorSpec([None], tf.int32)])
    def step(embeddings, labels):
        return layer(embeddings, labels, training=True)

    with pytest.raises(tf.errors.InvalidArgumentError, match="memory_size=4 is smaller"):
        step(x, y)


@pytest.mark.parametrize("loss", ["proxy_anchor", "npair", "lifted_structure", "xbm"])
def test_losses_without_a_query_key_form_are_rejected(loss):
    with pytest.raises(ValueError, match="Supported losses: \\['circle', 'contrastive'"):
        CrossBatchMemory(loss=loss, num_classes=4, embedding_dim=5)
    with pytest.raises(ValueError, match="Supported losses"):
        CrossBatchMemory(loss=losses.get(loss, num_classes=4, embedding_dim=5))


def test_other_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="start_step"):
        CrossBatchMemory(start_step=-1)
    with pytest.raises(ValueError, match="loss_config applies to a loss given by name"):
        CrossBatchMemory(loss=losses.get("circle"), loss_config={"gamma": 3.0})
    with pytest.raises(ValueError, match="dimension 5, embedding_dim=3"):
        CrossBatchMemory(embedding_dim=3)(*_batches(1)[0])
    x, y = _batches(1)[0]
    with pytest.raises(ValueError, match="6 embeddings but 3 labels"):
        CrossBatchMemory()(x, y[:3], training=True)


def test_config_round_trip_keeps_the_wrapped_loss_and_the_queue():
    layer = CrossBatchMemory(loss="circle", memory_size=9, start_step=1, loss_config={"gamma": 16.0}, name="xbm")
    for x, y in _batches(2, batch=4):
        layer(x, y, training=True)
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == "detreg_keras>CrossBatchMemory"
    clone = keras.saving.deserialize_keras_object(serialized)
    assert clone.get_config() == layer.get_config()
    assert clone.base_loss.get_config()["gamma"] == 16.0 and clone.start_step == 1
    assert clone.built  # deserialisation rebuilds it from its build config
    clone.set_weights(layer.get_weights())
    x, y = _batches(1, batch=4, seed=7)[0]
    np.testing.assert_allclose(float(clone(x, y, training=True)), float(layer(x, y, training=True)), rtol=1e-6)


def test_memory_stays_float32_under_mixed_precision():
    (x0, y0), (x, y) = _batches(2)
    reference = CrossBatchMemory(memory_size=12)
    reference(x0, y0, training=True)
    expected = float(reference(x, y, training=True))
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = CrossBatchMemory(memory_size=12)
        layer(tf.constant(x0, tf.float16), y0, training=True)
        value = layer(tf.constant(x, tf.float16), y, training=True)
    finally:
        keras.config.set_dtype_policy(previous)
    assert layer.memory_embeddings.dtype == "float32" and value.dtype == tf.float32
    np.testing.assert_allclose(float(value), expected, rtol=2e-3)  # only the float16 rounding of the inputs


# ------------------------------------------------------------- inside DRegModel
def _tiny_dreg(memory_size: int = 30, **loss_config):
    """A 2-coupling DReg model on 8x8 images with an XBM contrastive loss (same weights on every call)."""
    import detreg_keras as dr

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    features = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    model = dr.DRegModel(
        num_classes=4,
        backbone=keras.Model(inputs, features, name="backbone"),
        embedding_dim=8,
        num_couplings=2,
        hidden_units=8,
        loss="xbm",
        loss_config={"loss": "contrastive", "memory_size": memory_size, **loss_config},
    )
    model(np.zeros((2, 8, 8, 1), "float32"))  # built before fit, as BackupAndRestore requires
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    return model


def _images(count: int = 40):
    rng = np.random.default_rng(0)
    y = np.tile(np.arange(4), count // 4).astype("int32")
    x = (rng.uniform(0, 255, (count, 8, 8, 1)) + y[:, None, None, None] * 20).astype("float32")
    return x, y


def _queues(model) -> list[np.ndarray]:
    return [v.numpy() for loss in (model.loss_min, model.loss_max) for v in loss.non_trainable_weights]


def test_dreg_model_fills_each_heads_queue_in_training_only_and_saves_it(tmp_path):
    import detreg_keras as dr

    x, y = _images()
    model = _tiny_dreg()
    assert model.loss_min.all_gather is False  # the model hands it the global batch itself
    history = model.fit(x, y, batch_size=10, epochs=1, shuffle=False, verbose=0).history
    assert "contrastive_loss" in history and np.isfinite(history["loss"][0])
    for head in (model.loss_min, model.loss_max):
        assert int(head.filled.numpy()) == 30 and int(head.steps.numpy()) == 4
        assert int(head.write_pointer.numpy()) == 40 % 30
        np.testing.assert_array_equal(head.memory_labels.numpy()[:10], y[30:40])  # the 4th batch wrapped around
    # the two heads store their own embeddings (different flows)
    assert not np.allclose(model.loss_min.memory_embeddings.numpy(), model.loss_max.memory_embeddings.numpy())
    before = _queues(model)
    model.evaluate(x, y, batch_size=10, verbose=0)
    for a, b in zip(before, _queues(model)):
        np.testing.assert_array_equal(a, b)  # evaluation does not enqueue
    model.save(tmp_path / "xbm.keras")
    restored = dr.load_model(tmp_path / "xbm.keras")
    assert restored.get_config()["loss_config"] == model.get_config()["loss_config"]
    for a, b in zip(before, _queues(restored)):
        np.testing.assert_array_equal(a, b)


def test_backup_and_restore_resumes_with_the_same_queue(tmp_path):
    """3 epochs straight = 2 epochs, a crash, and a BackupAndRestore resume (weights and both queues)."""
    x, y = _images()

    class Crash(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("simulated preemption")

    straight = _tiny_dreg()
    straight.fit(x, y, batch_size=10, epochs=3, shuffle=False, verbose=0)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(RuntimeError, match="simulated preemption"):
        _tiny_dreg().fit(x, y, batch_size=10, epochs=3, shuffle=False, verbose=0, callbacks=[backup, Crash()])
    resumed = _tiny_dreg()
    history = resumed.fit(x, y, batch_size=10, epochs=3, shuffle=False, verbose=0, callbacks=[backup]).history
    assert len(history["loss"]) == 1  # only the third epoch ran
    assert int(resumed.loss_min.steps.numpy()) == 12
    for a, b in zip(_queues(straight), _queues(resumed)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
