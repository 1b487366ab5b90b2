"""DRegModel: training with model.fit, the Eq. 11 objective, variants, serialisation, bad input."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from detreg_keras.augment import between_sample_augment
from detreg_keras.losses import proxy_anchor_loss
from detreg_keras.model import DRegModel, l2_normalize
from detreg_keras.optim import make_optimizer
from detreg_keras.regularizers import determinant_regularizer

SMALL = dict(backbone="small_cnn", image_size=8, channels=1, embedding_dim=16, num_couplings=3, hidden_units=16)


def _data(n=60, num_classes=5, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), n // num_classes).astype("int32")
    # class-dependent means so there is something to learn
    images = rng.uniform(0, 255, (len(labels), 8, 8, 1)).astype("float32") * 0.3
    images += (labels[:, None, None, None] * 35.0).astype("float32")
    return images, labels


def _model(**kw):
    config = {**SMALL, **kw}
    return DRegModel(num_classes=config.pop("num_classes", 5), **config)


def _perturb_heads(model, seed=0):
    rng = np.random.default_rng(seed)
    for flow in (model.flow_min, model.flow_max):
        if flow is not None:
            for w in flow.trainable_weights:
                w.assign(w.numpy() + 0.1 * rng.standard_normal(w.shape).astype("float32"))


def test_objective_equals_eq11_recomputed_from_parts():
    model = _model()
    x, y = _data(20)
    model(x[:2])
    _perturb_heads(model)
    terms = model.compute_dreg_losses(tf.constant(x), tf.constant(y))
    z = model.embed_features(tf.constant(x))
    aug, valid = between_sample_augment(z, y, 0.4)
    points = tf.concat([z, aug], 0)
    mask = tf.concat([tf.ones_like(valid), valid], 0)
    out1, ld1 = model.flow_min.forward_with_log_diag(points)
    out2, ld2 = model.flow_max.forward_with_log_diag(points)
    pa1 = proxy_anchor_loss(l2_normalize(out1[:20]), y, model.loss_min.proxies)
    pa2 = proxy_anchor_loss(l2_normalize(out2[:20]), y, model.loss_max.proxies)
    r1 = determinant_regularizer(ld1, mask=mask)
    r2 = determinant_regularizer(ld2, mask=mask)
    expected = pa1 + pa2 + 0.05 * r1 - 0.05 * r2
    np.testing.assert_allclose(terms["loss"].numpy(), expected.numpy(), rtol=1e-5)
    np.testing.assert_allclose(terms["reg_min"].numpy(), r1.numpy(), rtol=1e-5)
    np.testing.assert_allclose(terms["reg_max"].numpy(), r2.numpy(), rtol=1e-5)
    # the two heads have separate proxies and separate permutations
    assert not np.allclose(model.loss_min.proxies.numpy(), model.loss_max.proxies.numpy())
    assert not np.array_equal(model.flow_min.permutations[0].numpy(), model.flow_max.permutations[0].numpy())


def test_call_returns_normalised_head1_embedding():
    model = _model()
    x, _ = _data(10)
    model(x[:2])
    _perturb_heads(model)
    emb = model(x).numpy()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    expected = l2_normalize(model.flow_min(model.embed_features(tf.constant(x)))).numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-6)


def test_fit_decreases_loss_and_logs_all_terms():
    model = _model()
    model.compile(optimizer=make_optimizer(learning_rate=1e-3, head_lr_multiplier=1.0))
    x, y = _data(60)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(60, seed=0).batch(30)
    history = model.fit(ds, epochs=6, verbose=0, callbacks=[keras.callbacks.TerminateOnNaN()])
    logs = history.history
    assert set(logs) == {"loss", "pa_loss", "reg_min", "reg_max"}
    assert logs["loss"][-1] < 0.8 * logs["loss"][0]
    assert all(np.isfinite(v).all() for v in logs.values())


@pytest.mark.parametrize(
    "variant,expected_metrics",
    [
        (dict(dueling=False), {"loss", "pa_loss", "reg_min"}),
        (dict(lambda_min=0.0, lambda_max=0.0), {"loss", "pa_loss", "reg_min", "reg_max"}),
        (dict(flow="none"), {"loss", "pa_loss"}),
        (dict(flow="nice"), {"loss", "pa_loss", "reg_min", "reg_max"}),
        (dict(regularizer_form="logdet", epsilon=0.0), {"loss", "pa_loss", "reg_min", "reg_max"}),
    ],
)
def test_variants_train(variant, expected_metrics):
    model = _model(**variant)
    model.compile(optimizer=make_optimizer(learning_rate=1e-3, head_lr_multiplier=1.0))
    x, y = _data(40)
    history = model.fit(x, y, batch_size=20, epochs=3, verbose=0)
    assert set(history.history) == expected_metrics
    assert history.history["loss"][-1] < history.history["loss"][0]
    if variant.get("flow") == "none":
        assert model.flow_min is None and model.flow_max is None
    if variant.get("dueling") is False:
        assert model.flow_max is None and model.loss_max is None


def test_single_head_and_unregularised_objectives():
    x, y = _data(20)
    single = _model(dueling=False)
    single(x[:2])
    _perturb_heads(single)
    terms = single.compute_dreg_losses(tf.constant(x), tf.constant(y))
    np.testing.assert_allclose(terms["loss"].numpy(), terms["dml"].numpy() + 0.05 * terms["reg_min"].numpy(), rtol=1e-5)
    plain = _model(lambda_min=0.0, lambda_max=0.0)
    plain(x[:2])
    terms = plain.compute_dreg_losses(tf.constant(x), tf.constant(y))
    np.testing.assert_allclose(terms["loss"].numpy(), terms["dml"].numpy(), rtol=1e-6)


def test_keras_round_trip_is_exact_and_training_resumes(tmp_path):
    model = _model(flow="realnvp")
    model.compile(optimizer=make_optimizer(learning_rate=1e-3))
    x, y = _data(40)
    model.fit(x, y, batch_size=20, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, DRegModel)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert json.loads(json.dumps(loaded.get_config())) == json.loads(json.dumps(model.get_config()))
    assert int(loaded.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())
    loaded.fit(x, y, batch_size=20, epochs=1, verbose=0)  # compiled from the saved config
    assert int(loaded.optimizer.iterations.numpy()) == 4


def test_nice_model_round_trip(tmp_path):
    model = _model(flow="nice", dueling=False)
    x, _ = _data(10)
    model(x[:2])
    _perturb_heads(model)
    model.save(tmp_path / "nice.keras")
    loaded = keras.models.load_model(tmp_path / "nice.keras")
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_fit_with_jit_compile_auto_and_callbacks(tmp_path):
    model = _model()
    model.compile(optimizer=make_optimizer(learning_rate=1e-3), jit_compile="auto")
    x, y = _data(40)
    ckpt = tmp_path / "ckpt.keras"
    history = model.fit(
        x,
        y,
        batch_size=20,
        epochs=2,
        verbose=0,
        validation_data=(x, y),
        callbacks=[keras.callbacks.ModelCheckpoint(ckpt), keras.callbacks.CSVLogger(tmp_path / "log.csv")],
    )
    assert ckpt.exists() and (tmp_path / "log.csv").exists()
    assert {"val_loss", "val_pa_loss", "val_reg_min", "val_reg_max"} <= set(history.history)
    results = model.evaluate(x, y, batch_size=20, verbose=0, return_dict=True)
    assert np.isfinite(results["loss"])


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_training_has_no_nan(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = _model()
        model.compile(optimizer=make_optimizer(learning_rate=1e-3))
        # float16 needs loss scaling (the custom train_step calls optimizer.scale_loss); bfloat16 does not
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (policy == "mixed_float16")
        x, y = _data(40)
        history = model.fit(x, y, batch_size=20, epochs=3, verbose=0)
        emb = model.predict(x, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(np.isfinite(v).all() for v in history.history.values())
    assert emb.dtype == np.float32 and np.isfinite(emb).all()


def test_singleton_classes_in_batch_are_handled():
    model = _model()
    x, _ = _data(5)
    y = np.arange(5, dtype="int32")  # every class appears once: no augmentation partner at all
    terms = model.compute_dreg_losses(tf.constant(x), tf.constant(y))
    assert all(np.isfinite(v.numpy()) for v in terms.values())


def test_bad_input_gives_clear_errors():
    model = _model()
    model.compile()
    x, y = _data(20)
    with pytest.raises(tf.errors.InvalidArgumentError, match="labels must be < num_classes=5"):
        model.fit(x, np.full(20, 7, "int32"), batch_size=10, epochs=1, verbose=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="labels must be >= 0"):
        model.compute_dreg_losses(tf.constant(x), tf.constant(np.full(20, -1, "int32")))
    with pytest.raises(ValueError, match="channels=1"):
        model.fit(np.zeros((4, 8, 8, 3), "float32"), np.zeros(4, "int32"), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="rank 4"):
        model.compute_dreg_losses(tf.zeros((4, 8, 8)), tf.zeros(4, tf.int32))
    with pytest.raises(ValueError, match="height=8"):
        model(np.zeros((2, 9, 8, 1), "float32"))
    with pytest.raises(ValueError, match="sample_weight"):
        model.fit(x, y, sample_weight=np.ones(20), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="labels"):
        model.fit(tf.data.Dataset.from_tensor_slices(x).batch(5), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="own loss"):
        model.compile(loss="mse")


def test_empty_dataset_raises_instead_of_silently_doing_nothing():
    model = _model()
    model.compile()
    empty = tf.data.Dataset.from_tensor_slices((np.zeros((0, 8, 8, 1), "float32"), np.zeros(0, "int32"))).batch(4)
    with pytest.raises(ValueError, match="empty"):
        model.fit(empty, epochs=1, verbose=0)


def test_bad_construction():
    with pytest.raises(ValueError, match="num_classes"):
        DRegModel(num_classes=1, **SMALL)
    with pytest.raises(ValueError, match="epsilon"):
        DRegModel(num_classes=3, epsilon=2.0, **SMALL)
    with pytest.raises(ValueError, match="Unknown flow"):
        DRegModel(num_classes=3, **{**SMALL, "flow": "glow"})
    with pytest.raises(TypeError, match="backbone"):
        DRegModel(num_classes=3, backbone=42)


def test_non_finite_input_or_term_stops_training_and_keeps_weights_and_checkpoint(tmp_path):
    model = _model()
    model.compile(optimizer=make_optimizer(learning_rate=1e-3))
    x, y = _data(20)
    ckpt = tmp_path / "last_good.keras"
    model.fit(x, y, batch_size=10, epochs=1, verbose=0, callbacks=[keras.callbacks.ModelCheckpoint(ckpt)])
    good_weights = model.get_weights()
    poisoned = x.copy()
    poisoned[3, 0, 0, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="the input images became non-finite"):
        model.fit(poisoned, y, batch_size=20, epochs=1, verbose=0, callbacks=[keras.callbacks.ModelCheckpoint(ckpt)])
    for before, after in zip(good_weights, model.get_weights()):  # BatchNorm statistics included
        np.testing.assert_array_equal(before, after)
    restored = keras.models.load_model(ckpt)
    np.testing.assert_array_equal(restored.predict(x, verbose=0), model.predict(x, verbose=0))
    # a term that goes non-finite inside the model is named, and the optimizer step is not applied
    # (the forward pass of a *trainable* BatchNorm has already updated its moving statistics)
    proxies = model.loss_min.proxies
    proxies.assign(np.full(proxies.shape, np.nan, "float32"))
    others = [w for w in model.trainable_weights if w is not proxies]
    before = [w.numpy().copy() for w in others]
    with pytest.raises(tf.errors.InvalidArgumentError, match="the (loss|dml) term became non-finite"):
        model.fit(x, y, batch_size=20, epochs=1, verbose=0)
    for value, w in zip(before, others):
        np.testing.assert_array_equal(value, w.numpy())


def test_strong_maximising_branch_and_extreme_inputs_stay_finite():
    model = _model(lambda_max=0.5, lambda_min=0.05)
    model.compile(optimizer=make_optimizer(learning_rate=1e-2, head_lr_multiplier=10.0, proxy_lr_multiplier=100.0))
    rng = np.random.default_rng(0)
    x = rng.choice([0.0, 255.0], size=(40, 8, 8, 1)).astype("float32")  # saturated binary images
    x[:10] *= 40.0  # far outside the pixel range
    y = np.repeat(np.arange(5), 8).astype("int32")
    history = model.fit(x, y, batch_size=20, epochs=15, verbose=0)
    assert all(np.isfinite(v).all() for v in history.history.values())
    assert np.isfinite(model.predict(x, verbose=0)).all()


def test_load_model_reports_truncated_and_missing_files(tmp_path):
    from detreg_keras.model import load_model

    model = _model(dueling=False)
    x, _ = _data(5)
    model(x[:2])
    path = tmp_path / "model.keras"
    model.save(path)
    np.testing.assert_array_equal(load_model(path)(x).numpy(), model(x).numpy())  # safe_mode=True works
    data = path.read_bytes()
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_model(truncated)
    with pytest.raises(FileNotFoundError, match="No saved model"):
        load_model(tmp_path / "missing.keras")
    assert path.read_bytes() == data  # the good file is untouched
