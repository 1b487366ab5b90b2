"""DRegModel: training with model.fit, the Eq. 11 objective, variants, serialisation, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from detreg_keras.augment import between_sample_augment
from detreg_keras.losses import proxy_anchor_loss
from detreg_keras.model import DRegModel, l2_normalize, normalize_head_input
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


def _head_input(model, z):
    """The heads' input written out: √d·z/‖z‖ for ``head_input_norm="l2"`` (the default), else z."""
    if model.head_input_norm == "none":
        return z
    z = np.asarray(z, np.float64)
    return np.sqrt(z.shape[1]) * z / np.linalg.norm(z, axis=1, keepdims=True)


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
    z = tf.constant(_head_input(model, model.embed_features(tf.constant(x)).numpy()), tf.float32)
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
    z = _head_input(model, model.embed_features(tf.constant(x)).numpy())
    expected = l2_normalize(model.flow_min(tf.constant(z, tf.float32))).numpy()
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
    # one check names exactly the non-finite terms: the proxies poison the base loss, the total and the gradients
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"these terms became non-finite \(NaN/Inf\):\] \[dml \(base loss of the heads\), loss \(the total\), "
        r"gradients \(global norm\)\]",
    ):
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



# ----------------------------------------------------------------------------------------------
# Eq. 11 through add_loss, against an independent numpy computation

def _numpy_proxy_anchor(emb, labels, proxies, margin=0.1, alpha=32.0):
    """Proxy Anchor (Kim et al. 2020, official formula) in float64 numpy."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    p = proxies / np.linalg.norm(proxies, axis=1, keepdims=True)
    cos = e @ p.T
    pos = labels[:, None] == np.arange(p.shape[0])[None, :]
    pos_sum = np.where(pos, np.exp(-alpha * (cos - margin)), 0.0).sum(0)
    neg_sum = np.where(~pos, np.exp(alpha * (cos + margin)), 0.0).sum(0)
    with_pos = pos.any(0)
    return np.log1p(pos_sum[with_pos]).sum() / with_pos.sum() + np.log1p(neg_sum).sum() / p.shape[0]


def _numpy_augment(z, labels, eps):
    """z_ij = z_i + eps (z_j - z_i), z_j the most cosine-similar other sample of the class."""
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    sim = unit @ unit.T
    out, valid = z.copy(), np.zeros(len(z), bool)
    for i in range(len(z)):
        others = [j for j in range(len(z)) if j != i and labels[j] == labels[i]]
        if others:
            j = max(others, key=lambda k: sim[i, k])
            out[i], valid[i] = z[i] + eps * (z[j] - z[i]), True
    return out, valid


def _numpy_realnvp(flow, x):
    """A Real-NVP head in numpy from its weights: (y, per-sample R of Eq. 10 summed over the K blocks)."""
    h, r = np.asarray(x, np.float64), 0.0
    for layer, perm in flow._steps():
        m, bound = layer.num_masked, layer.log_scale_bound
        a = h[:, :m]
        for dense in layer.net.hidden:
            a = np.maximum(a @ dense.kernel.numpy() + dense.bias.numpy(), 0.0)
        out = a @ layer.net.out.kernel.numpy() + layer.net.out.bias.numpy()
        shift, raw = np.split(out, 2, axis=1)
        s = bound * np.tanh(raw / bound)
        if layer.shift_bound is not None:
            shift = layer.shift_bound * np.tanh(shift / layer.shift_bound)
        diag = np.concatenate([np.ones((len(h), m)), np.exp(s)], axis=1)  # the Jacobian diagonal
        r = r + np.log1p(np.abs(diag)).sum(1) / h.shape[1]
        h = np.concatenate([h[:, :m], h[:, m:] * np.exp(s) + shift], axis=1)
        if perm is not None:
            h = h[:, perm.numpy()]
    return h, r


def _numpy_eq11(model, x, y, lam1, lam2):
    z = _head_input(model, model.embed_features(tf.constant(x), training=True).numpy().astype(np.float64))
    aug, valid = _numpy_augment(z, y, model.epsilon)
    points, mask = np.concatenate([z, aug]), np.concatenate([np.ones(len(z), bool), valid])
    e1, r1 = _numpy_realnvp(model.flow_min, points)
    e2, r2 = _numpy_realnvp(model.flow_max, points)
    pa1 = _numpy_proxy_anchor(e1[: len(z)], y, model.loss_min.proxies.numpy().astype(np.float64))
    pa2 = _numpy_proxy_anchor(e2[: len(z)], y, model.loss_max.proxies.numpy().astype(np.float64))
    big_r1, big_r2 = r1[mask].mean(), r2[mask].mean()
    return pa1 + pa2 + lam1 * big_r1 - lam2 * big_r2, lam1 * big_r1, -lam2 * big_r2


@keras.saving.register_keras_serializable(package="detreg_keras_tests")
class _UserAddLoss(keras.layers.Layer):
    """A user's own add_loss term: 0.25·mean(x²) of its input."""

    def call(self, x):
        self.add_loss(0.25 * tf.reduce_mean(tf.square(x)))
        return x


def _tiny_backbone(with_user_loss: bool) -> keras.Model:
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(keras.layers.Rescaling(1 / 255.0)(inputs))
    if with_user_loss:
        x = _UserAddLoss(name="user_loss")(x)
    return keras.Model(inputs, x, name="tiny_backbone")


def _numpy_user_term(model, x):
    conv = keras.Model(model.backbone.input, model.backbone.get_layer("conv").output)
    return 0.25 * np.mean(np.square(conv(x).numpy().astype(np.float64)))


@pytest.mark.parametrize("with_user_loss", [False, True])
def test_training_forward_adds_the_two_regularizer_terms_through_add_loss(with_user_loss):
    """model.losses after one training forward pass: ±λR(Z) of each head (and the user's term), counted once."""
    lam1, lam2 = 0.3, 0.1
    x, y = _data(20)
    model = _model(backbone=_tiny_backbone(with_user_loss), lambda_min=lam1, lambda_max=lam2)
    model(x[:2])
    _perturb_heads(model, seed=3)
    terms = model.compute_dreg_losses(tf.constant(x), tf.constant(y), training=True)
    expected_total, plus_r1, minus_r2 = _numpy_eq11(model, x, y, lam1, lam2)
    assert abs(plus_r1 + minus_r2) > 1e-3  # the two terms do not cancel: a missing or doubled one shows
    assert [len(model.reg_min.losses), len(model.reg_max.losses)] == [1, 1]
    np.testing.assert_allclose(model.reg_min.losses[0].numpy(), plus_r1, rtol=1e-5)
    np.testing.assert_allclose(model.reg_max.losses[0].numpy(), minus_r2, rtol=1e-5)
    values = sorted(float(v) for v in model.losses)
    user = [_numpy_user_term(model, x)] if with_user_loss else []
    np.testing.assert_allclose(values, sorted([plus_r1, minus_r2] + user), rtol=1e-5)  # exactly these terms
    np.testing.assert_allclose(terms["loss"].numpy(), expected_total + sum(user), rtol=1e-5)
    np.testing.assert_allclose(terms["loss"].numpy(), terms["dml"].numpy() + sum(values), rtol=1e-6)
    # train_step adds them once too: with a zero learning rate the logged loss is the same total
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    history = model.fit(x, y, batch_size=20, epochs=1, shuffle=False, verbose=0).history
    np.testing.assert_allclose(history["loss"][0], expected_total + sum(user), rtol=1e-5)


MIRRORED_ADD_LOSS = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    import detreg_keras as dr
    from tests.test_model import _tiny_backbone

    def make():
        return dr.DRegModel(num_classes=4, backbone=_tiny_backbone(True), embedding_dim=8, num_couplings=2,
                            hidden_units=8, lambda_min=0.5, lambda_max=0.2)

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 5).astype("int32")
    x = (rng.uniform(0, 255, (20, 8, 8, 1)) + y[:, None, None, None] * 20).astype("float32")
    keras.utils.set_random_seed(0)
    single = make()
    single(x[:2])
    for w in single.flow_min.trainable_weights + single.flow_max.trainable_weights:
        w.assign(w + 0.3 * tf.random.normal(w.shape, seed=1))
    initial = single.get_weights()
    reference = float(single.compute_dreg_losses(tf.constant(x), tf.constant(y), training=True)["loss"])
    single.compile(optimizer=keras.optimizers.SGD(0.05))
    h1 = single.fit(x, y, batch_size=20, epochs=1, shuffle=False, verbose=0).history
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = make()
        mirrored(x[:2])
        mirrored.set_weights(initial)
        mirrored.compile(optimizer=keras.optimizers.SGD(0.05))
    h2 = mirrored.fit(x, y, batch_size=20, epochs=1, shuffle=False, verbose=0).history
    diff = max(float(np.abs(a - b).max()) for a, b in zip(single.get_weights(), mirrored.get_weights()))
    print(json.dumps({"reference": reference, "single": h1["loss"][0], "mirrored": h2["loss"][0], "diff": diff}))
    """
)


def test_add_loss_terms_are_exact_under_mirrored_strategy(tmp_path):
    """Replica threads share the layers' loss lists and switch at the all_gather: each term still counts once.

    Reading ``model.losses`` once after the forward pass instead gave replica 1 both replicas' ±λR terms
    and replica 0 the other replica's user term (measured while writing this test).
    """
    script = tmp_path / "mirrored_add_loss.py"
    script.write_text(MIRRORED_ADD_LOSS)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert abs(out["single"] - out["reference"]) < 1e-5 * abs(out["reference"])
    assert abs(out["mirrored"] - out["single"]) < 1e-5 * abs(out["single"])
    assert out["diff"] < 1e-5


# ----------------------------------------------------------------------------------------------
# R's scale, layout versions, bad input

def test_coupling_reduction_mean_divides_r_by_the_number_of_blocks():
    x, y = _data(20)
    models = {}
    for reduction in ("sum", "mean"):
        keras.utils.set_random_seed(0)
        models[reduction] = _model(coupling_reduction=reduction, lambda_min=0.2, lambda_max=0.1)
        models[reduction](x[:2])
    models["mean"].set_weights(models["sum"].get_weights())
    _perturb_heads(models["sum"], seed=5)
    models["mean"].set_weights(models["sum"].get_weights())
    t_sum = models["sum"].compute_dreg_losses(tf.constant(x), tf.constant(y))
    t_mean = models["mean"].compute_dreg_losses(tf.constant(x), tf.constant(y))
    k = SMALL["num_couplings"]
    np.testing.assert_allclose(t_mean["reg_min"].numpy() * k, t_sum["reg_min"].numpy(), rtol=1e-5)
    np.testing.assert_allclose(t_mean["reg_max"].numpy() * k, t_sum["reg_max"].numpy(), rtol=1e-5)
    np.testing.assert_allclose(t_mean["dml"].numpy(), t_sum["dml"].numpy(), rtol=1e-6)
    assert models["mean"].get_config()["coupling_reduction"] == "mean"
    assert DRegModel.from_config(models["mean"].get_config()).reg_min.coupling_reduction == "mean"


FIXTURES = Path(__file__).resolve().parent / "fixtures" / "flow_layout_v1"


@pytest.mark.parametrize("flow", ["realnvp", "nice"])
def test_models_saved_with_the_pre_tfp_flow_layout_still_load(flow):
    """Files written by the hand-written Keras flows (layout 1, tests/fixtures/.../make_fixture.py) load unchanged."""
    expected = np.load(FIXTURES / "expected.npz")
    path = FIXTURES / f"dreg_{flow}.keras"
    with zipfile.ZipFile(path) as archive:
        assert "flow_layout_version" not in json.loads(archive.read("config.json"))["config"]
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(expected["images"], verbose=0), expected[f"embeddings_{flow}"],
                               atol=1e-6)
    assert loaded.get_config()["flow_layout_version"] == 2


def test_a_newer_flow_layout_fails_with_a_message_naming_its_version(tmp_path):
    target = tmp_path / "future.keras"
    with zipfile.ZipFile(FIXTURES / "dreg_realnvp.keras") as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                config["config"]["flow_layout_version"] = 3
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    with pytest.raises(Exception, match="saved with flow layout version 3 .written by a newer detreg_keras"):
        keras.models.load_model(target)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lambda_min=-0.05), "lambda_min"),
        (dict(lambda_max=-1.0), "lambda_max"),
        (dict(lambda_max=float("nan")), "lambda_max"),
        (dict(lambda_min=float("inf")), "lambda_min"),
        (dict(epsilon=-0.1), "epsilon"),
        (dict(epsilon=1.01), "epsilon"),
        (dict(epsilon=float("nan")), "epsilon"),
        (dict(num_couplings=0), "num_couplings"),
        (dict(embedding_dim=1), "embedding_dim must be >= 2"),
        (dict(log_scale_bound=0.0), "log_scale_bound"),
        (dict(coupling_reduction="max"), "coupling_reduction"),
        (dict(regularizer_form="frobenius"), "form"),
    ],
)
def test_bad_hyperparameters_are_rejected_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _model(**kwargs)


def test_non_finite_log_scale_is_named_by_the_guard_and_nothing_is_updated():
    model = _model()
    model.compile(optimizer=make_optimizer(learning_rate=1e-3))
    x, y = _data(20)
    model.fit(x, y, batch_size=20, epochs=1, verbose=0)
    bias = model.flow_min.couplings[1].net.out.bias
    bias.assign(np.full(bias.shape, np.nan, "float32"))
    before = [w.numpy().copy() for w in model.trainable_weights if w is not bias]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"log_scale_min \(log\|J_tt\| of head 1, dreg_flow_min\)"):
        model.fit(x, y, batch_size=20, epochs=1, verbose=0)
    for value, w in zip(before, [w for w in model.trainable_weights if w is not bias]):
        np.testing.assert_array_equal(value, w.numpy())


def test_nice_regularizer_is_input_independent_and_sends_no_gradient_to_the_backbone():
    model = _model(flow="nice", lambda_min=1.0, lambda_max=0.0, dueling=False)
    x, y = _data(20)
    model(x[:2])
    _perturb_heads(model, seed=2)
    with tf.GradientTape() as tape:
        z = model.embed_features(tf.constant(x), training=False)
        _, log_diag = model.flow_min.forward_with_log_diag(z)
        from detreg_keras.regularizers import per_sample_regularizer

        per_sample = per_sample_regularizer(log_diag)
        r = tf.reduce_mean(per_sample)
    np.testing.assert_allclose(per_sample.numpy(), per_sample.numpy()[0], rtol=1e-6)  # the same R for every input
    grads = tape.gradient(r, model.backbone.trainable_weights + model.embedding.trainable_weights
                          + model.flow_min.couplings[0].trainable_weights + [model.flow_min.scale.raw_log_scale])
    assert all(g is None for g in grads[:-1])
    assert np.abs(grads[-1].numpy()).max() > 0  # only the diagonal scale σ receives R's gradient


# ----------------------------------------------------------------------------------------------
# Head-input normalisation and bounded shifts (issue 13)


def test_l2_head_input_is_sqrt_d_times_the_unit_feature():
    z = tf.constant([[3.0, 4.0], [0.0, -2.0]])
    np.testing.assert_allclose(normalize_head_input(z, "l2").numpy(),
                               np.sqrt(2.0) * np.array([[0.6, 0.8], [0.0, -1.0]]), rtol=1e-6)
    np.testing.assert_array_equal(normalize_head_input(z, "none").numpy(), z.numpy())
    with pytest.raises(ValueError, match="head_input_norm"):
        normalize_head_input(z, "batch")


def test_l2_head_input_feeds_both_heads_and_inference():
    """head_input_norm="l2": the heads see √d·z/‖z‖ in training and inference; the embedding ignores ‖z‖."""
    x, y = _data(20)
    model = _model(head_input_norm="l2", shift_bound=0.5)
    model(x[:2])
    _perturb_heads(model, seed=3)
    z = model.embed_features(tf.constant(x))
    d = float(model.embedding_dim)
    u = np.sqrt(d) * z.numpy() / np.linalg.norm(z.numpy(), axis=1, keepdims=True)  # independent reference
    expected = l2_normalize(model.flow_min(tf.constant(u))).numpy()
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-5)
    np.testing.assert_allclose(model.head_embedding(3.0 * z).numpy(), model.head_embedding(z).numpy(), atol=1e-5)
    terms = model.compute_dreg_losses(tf.constant(x), tf.constant(y))
    aug, valid = between_sample_augment(tf.constant(u), y, 0.4)
    points = tf.concat([tf.constant(u), aug], 0)
    mask = tf.concat([tf.ones_like(valid), valid], 0)
    _, ld1 = model.flow_min.forward_with_log_diag(points)
    _, ld2 = model.flow_max.forward_with_log_diag(points)
    np.testing.assert_allclose(terms["reg_min"].numpy(), determinant_regularizer(ld1, mask=mask).numpy(), rtol=1e-5)
    np.testing.assert_allclose(terms["reg_max"].numpy(), determinant_regularizer(ld2, mask=mask).numpy(), rtol=1e-5)
    assert model.flow_min.shift_bound == model.flow_max.shift_bound == 0.5


def test_head_input_norm_and_shift_bound_are_saved(tmp_path):
    x, _ = _data(10)
    model = _model(head_input_norm="l2", shift_bound=1.0)
    model(x[:2])
    _perturb_heads(model, seed=4)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.head_input_norm == "l2" and loaded.shift_bound == 1.0
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    config = model.get_config()
    old = {k: v for k, v in config.items() if k not in ("head_input_norm", "shift_bound")}
    assert DRegModel.from_config(old).head_input_norm == "none"
    with pytest.raises(ValueError, match="head_input_norm"):
        _model(head_input_norm="tanh")
