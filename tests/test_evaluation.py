"""Tests for detreg_keras.evaluation (embedding, callback, TensorBoard, plot)."""

from __future__ import annotations

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from detreg_keras import evaluation as E
from detreg_keras import metrics as M

KS = (1, 2, 4)


def _data(seed=0, n_classes=6, per_class=8, dim=8):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    centers = rng.normal(size=(n_classes, dim))
    x = (centers[labels] + 0.7 * rng.normal(size=(len(labels), dim))).astype(np.float32)
    return x, labels


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.layers.Input((8,)), keras.layers.Dense(4)])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    return model


def _train_xy(seed=1, n=64):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8)).astype(np.float32), rng.normal(size=(n, 4)).astype(np.float32)


def _event_scalars(log_dir):
    """{tag: {step: value}} from all event files under log_dir."""
    out: dict[str, dict[int, float]] = {}
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.HasField("tensor") and value.metadata.plugin_data.plugin_name != "scalars":
                    continue  # e.g. the model config text summary
                number = (
                    float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                )
                out.setdefault(value.tag, {})[int(event.step)] = number
    return out


# --------------------------------------------------------------------------- #
# embed / evaluate_model
# --------------------------------------------------------------------------- #
def test_embed_arrays_dataset_and_callable_agree():
    x, y = _data()
    model = _model()
    expected = model.predict(x, verbose=0)
    emb, lab = E.embed(model, (x, y), batch_size=5)
    np.testing.assert_allclose(emb, expected, atol=1e-6)
    np.testing.assert_array_equal(lab, y)
    # Batched dataset with [batch, 1] labels.
    ds = tf.data.Dataset.from_tensor_slices((x, y[:, None])).batch(7)
    emb_ds, lab_ds = E.embed(model, ds)
    np.testing.assert_allclose(emb_ds, expected, atol=1e-6)
    np.testing.assert_array_equal(lab_ds, y)
    # Plain callable on arrays, in small batches.
    emb_fn, _ = E.embed(lambda b: model(b, training=False), (x, y), batch_size=3)
    np.testing.assert_allclose(emb_fn, expected, atol=1e-6)


def test_embed_shuffled_unbatched_dataset_keeps_alignment():
    x, _ = _data()
    ids = np.arange(len(x))  # a unique label per item identifies its input
    model = _model()
    ds = tf.data.Dataset.from_tensor_slices((x, ids)).shuffle(64, seed=3)
    emb, lab = E.embed(model, ds, batch_size=10)  # scalar labels -> batched here
    assert sorted(lab.tolist()) == ids.tolist() and lab.tolist() != ids.tolist()
    np.testing.assert_allclose(emb, model.predict(x[lab], verbose=0), atol=1e-6)


def test_embed_rejects_bad_inputs():
    x, y = _data()
    model = _model()
    with pytest.raises(TypeError, match="pick"):
        E.embed(lambda b: {"embedding": b}, (x, y))
    with pytest.raises(ValueError, match=r"\[batch\] or \[batch, 1\]"):
        E.embed(model, (x, np.zeros((len(x), 3))))
    with pytest.raises(ValueError, match="tf.data.Dataset"):
        E.embed(model, x)
    with pytest.raises(ValueError, match=r"\(images, labels\)"):
        E.embed(model, tf.data.Dataset.from_tensor_slices(x))


def test_evaluate_model_matches_metrics_on_predictions():
    x, y = _data()
    qx, qy = _data(seed=5)
    model = _model()
    got = E.evaluate_model(model, (x, y), KS)
    assert got == pytest.approx(M.evaluate_embeddings(model.predict(x, verbose=0), y, KS))
    got_q = E.evaluate_model(model, (x, y), KS, query_data=(qx, qy), metrics=("recall",))
    ref_q = M.evaluate_embeddings(
        model.predict(x, verbose=0), y, KS,
        query_embeddings=model.predict(qx, verbose=0), query_labels=qy, metrics=("recall",),
    )
    assert got_q == pytest.approx(ref_q) and set(got_q) == {f"recall@{k}" for k in KS}


# --------------------------------------------------------------------------- #
# RetrievalEvaluation
# --------------------------------------------------------------------------- #
def test_callback_writes_history_and_keeps_best_checkpoint(tmp_path):
    x, y = _data()
    tx, ty = _train_xy()
    model = _model()
    path = tmp_path / "ckpt" / "best.keras"
    cb = E.RetrievalEvaluation((x, y), ks=KS, monitor="val_map@r", filepath=path, verbose=0)
    snapshots = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, l: snapshots.append(model.get_weights()))
    history = model.fit(tx, ty, epochs=3, batch_size=16, verbose=0, callbacks=[cb, record])

    keys = [f"val_recall@{k}" for k in KS] + ["val_map@r", "val_r_precision", "val_precision@1"]
    for key in keys:
        assert len(history.history[key]) == 3, key
        assert all(0.0 <= v <= 1.0 for v in history.history[key])
    assert "val_nmi" not in history.history
    # The last logged values are the metrics of the final model.
    final = E.evaluate_model(model, (x, y), KS, metrics=E.DEFAULT_CALLBACK_METRICS)
    assert history.history["val_map@r"][-1] == pytest.approx(final["map@r"])
    # Best value/epoch match the history, and the checkpoint is that epoch's model.
    maps = history.history["val_map@r"]
    assert cb.best == pytest.approx(max(maps)) and cb.best_epoch == int(np.argmax(maps))
    assert path.exists()
    reloaded = keras.models.load_model(path)
    for w_saved, w_epoch in zip(reloaded.get_weights(), snapshots[cb.best_epoch]):
        np.testing.assert_allclose(w_saved, w_epoch)
    assert E.evaluate_model(reloaded, (x, y), KS)["map@r"] == pytest.approx(cb.best)


def test_callback_checkpoint_follows_best_not_last(tmp_path, monkeypatch):
    x, y = _data()
    tx, ty = _train_xy()
    model = _model()
    path = tmp_path / "best.keras"
    cb = E.RetrievalEvaluation((x, y), ks=(1,), metrics=("recall",), filepath=path, verbose=0)
    scripted = iter([0.3, 0.8, 0.5, float("nan")])
    monkeypatch.setattr(cb, "evaluate", lambda: {"recall@1": next(scripted)})
    saves = []
    real_save = model.save
    monkeypatch.setattr(model, "save", lambda p, *a, **k: (saves.append(model.get_weights()), real_save(p, *a, **k)))
    history = model.fit(tx, ty, epochs=4, batch_size=16, verbose=0, callbacks=[cb])
    assert history.history["val_recall@1"][:3] == [0.3, 0.8, 0.5]
    assert len(saves) == 2 and cb.best == 0.8 and cb.best_epoch == 1
    reloaded = keras.models.load_model(path)
    for a, b in zip(reloaded.get_weights(), saves[-1]):
        np.testing.assert_allclose(a, b)


def test_callback_every_n_epochs(tmp_path):
    x, y = _data()
    tx, ty = _train_xy()
    model = _model()
    cb = E.RetrievalEvaluation((x, y), ks=(1, 2), metrics=("recall",), every_n_epochs=2, verbose=0)
    history = model.fit(tx, ty, epochs=5, batch_size=32, verbose=0, callbacks=[cb])
    assert len(history.history["loss"]) == 5
    assert len(history.history["val_recall@1"]) == 2
    assert sorted(cb.results) == [1, 3]
    assert history.history["val_recall@2"] == [cb.results[1]["recall@2"], cb.results[3]["recall@2"]]


def test_callback_with_query_data_and_custom_prefix():
    x, y = _data()
    qx, qy = _data(seed=7)
    tx, ty = _train_xy()
    model = _model()
    cb = E.RetrievalEvaluation(
        (x, y), (qx, qy), ks=(1,), metrics=("recall", "nmi"), prefix="inshop_",
        monitor="inshop_recall@1", verbose=0,
    )
    history = model.fit(tx, ty, epochs=1, verbose=0, callbacks=[cb])
    expected = E.evaluate_model(model, (x, y), (1,), query_data=(qx, qy), metrics=("recall", "nmi"))
    assert history.history["inshop_recall@1"] == [pytest.approx(expected["recall@1"])]
    assert history.history["inshop_nmi"] == [pytest.approx(expected["nmi"])]


def test_tensorboard_after_callback_logs_the_metrics(tmp_path):
    pytest.importorskip("tensorboard", reason="keras.callbacks.TensorBoard needs the tensorboard package")
    x, y = _data()
    tx, ty = _train_xy()
    model = _model()
    log_dir = str(tmp_path / "tb")
    cb = E.RetrievalEvaluation((x, y), ks=KS, verbose=0)
    history = model.fit(
        tx, ty, epochs=2, verbose=0,
        callbacks=[cb, keras.callbacks.TensorBoard(log_dir=log_dir)],
    )
    val = _event_scalars(os.path.join(log_dir, "validation"))
    # TensorBoard strips "val_" and writes to the validation run.
    for key in ("recall@1", "recall@4", "map@r", "r_precision", "precision@1"):
        tag = f"epoch_{key}"
        assert tag in val, sorted(val)
        assert val[tag] == {
            0: pytest.approx(history.history[f"val_{key}"][0]),
            1: pytest.approx(history.history[f"val_{key}"][1]),
        }
    assert "epoch_loss" in _event_scalars(os.path.join(log_dir, "train"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(monitor="val_recall@3"), "not one of the keys"),
        (dict(monitor="recall@1"), "not one of the keys"),
        (dict(filepath="best.ckpt"), "'.keras'"),
        (dict(filepath="best.keras", monitor=None), "needs a monitor"),
        (dict(every_n_epochs=0), "every_n_epochs"),
        (dict(mode="auto"), "mode"),
        (dict(metrics=("recall", "auc")), "unknown metric"),
    ],
)
def test_callback_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        E.RetrievalEvaluation(_data(), **kwargs)


def test_callback_keeps_constructor_args():
    data = _data()
    cb = E.RetrievalEvaluation(data, ks=(1, 8), every_n_epochs=3, mode="min", monitor="val_map@r", max_r=50)
    assert cb.ks == (1, 8) and cb.every_n_epochs == 3 and cb.mode == "min"
    assert cb.monitor == "val_map@r" and cb.eval_kwargs == {"max_r": 50} and cb.data is data
    assert cb.best == float("inf")


# --------------------------------------------------------------------------- #
# plot
# --------------------------------------------------------------------------- #
def test_plot_recall_at_k_writes_png(tmp_path):
    import matplotlib.image

    curves = {
        "baseline": {"recall@1": 0.6, "recall@2": 0.72, "recall@4": 0.81, "recall@8": 0.88, "map@r": 0.2},
        "DReg": {"val_recall@1": 0.66, "val_recall@2": 0.77, "val_recall@4": 0.85, "val_recall@8": 0.91},
    }
    out = E.plot_recall_at_k(curves, tmp_path / "plots" / "recall.png")
    assert out.exists()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0.01  # not blank
    with pytest.raises(ValueError, match="no 'recall@k'"):
        E.plot_recall_at_k({"x": {"map@r": 0.1}}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="empty"):
        E.plot_recall_at_k({}, tmp_path / "bad.png")
