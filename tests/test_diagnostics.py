"""Local Lipschitz diagnostics: power-iteration spectral norms vs exact SVDs, segments, secants, report."""

from __future__ import annotations

import csv
import importlib.util
import types
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from detreg_keras import diagnostics as dg
from detreg_keras.backbones import build_backbone
from detreg_keras.model import DRegModel, l2_normalize

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(backbone="small_cnn", image_size=8, channels=1, embedding_dim=8, num_couplings=2, hidden_units=8)


def _exact_sigma_max(fn, x) -> np.ndarray:
    """Largest singular value of each per-sample Jacobian, from ``batch_jacobian`` + SVD."""
    x = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    jac = tape.batch_jacobian(y, x).numpy().astype(np.float64)
    batch = jac.shape[0]
    out_dim = int(np.prod(y.shape[1:]))
    return np.linalg.svd(jac.reshape(batch, out_dim, -1), compute_uv=False)[:, 0]


def _perturb(layer_weights, rng, scale):
    for w in layer_weights:
        w.assign(w.numpy() + scale * rng.standard_normal(w.shape).astype("float32"))


@pytest.fixture(scope="module")
def small_model():
    """Built small DRegModel whose flows are non-trivial (their output layers start at zero)."""
    keras.utils.set_random_seed(7)
    model = DRegModel(num_classes=3, **SMALL)
    model.build((None, 8, 8, 1))
    rng = np.random.default_rng(0)
    _perturb(model.flow_min.trainable_weights, rng, 0.3)
    # non-trivial BatchNorm statistics, so inference-mode BN is not the identity
    for layer in model.backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(0.1 * rng.standard_normal(layer.moving_mean.shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape).astype("float32"))
    return model


def _images(n, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, 8, 8, 1)).astype("float32")


# ----------------------------------------------------------------------------- spectral norm
def test_linear_map_known_sigma_max():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    v, _ = np.linalg.qr(rng.standard_normal((7, 7)))
    singular = np.array([3.0, 1.5, 1.0, 0.5, 0.1])
    w = (u @ np.diag(singular) @ v[:5]).astype("float32")  # [5, 7], sigma_max = 3 exactly
    x = rng.standard_normal((6, 7)).astype("float32")
    sigma = dg.spectral_norm_jvp(lambda x: tf.matmul(x, w, transpose_b=True), x, num_iters=30).numpy()
    assert sigma.shape == (6,)
    np.testing.assert_allclose(sigma, 3.0, rtol=1e-4)
    np.testing.assert_allclose(sigma, _exact_sigma_max(lambda x: tf.matmul(x, w, transpose_b=True), x), rtol=1e-4)
    # approaches from below: one iteration already a lower bound
    rough = dg.spectral_norm_jvp(lambda x: tf.matmul(x, w, transpose_b=True), x, num_iters=1).numpy()
    assert np.all(rough <= 3.0 * (1 + 1e-5))


def test_any_input_rank_and_eager_mode():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((2 * 3 * 2, 4)).astype("float32")

    def fn(x):  # images [B, 2, 3, 2] -> [B, 4]
        return tf.tanh(tf.matmul(tf.reshape(x, [-1, 12]), w))

    x = rng.standard_normal((5, 2, 3, 2)).astype("float32")
    exact = _exact_sigma_max(fn, x)
    np.testing.assert_allclose(dg.spectral_norm_jvp(fn, x, num_iters=200).numpy(), exact, rtol=1e-3)
    # chunking gives the same answers (row-wise map)
    np.testing.assert_allclose(dg.spectral_norm_jvp(fn, x, num_iters=200, batch_size=2).numpy(), exact, rtol=1e-3)
    # eager and compiled steps agree iteration for iteration (same start vectors)
    np.testing.assert_allclose(
        dg.spectral_norm_jvp(fn, x, num_iters=4, compile=False).numpy(),
        dg.spectral_norm_jvp(fn, x, num_iters=4).numpy(),
        rtol=1e-5,
    )


def test_nonlinear_mlp_matches_batch_jacobian():
    keras.utils.set_random_seed(3)
    mlp = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(16, activation="softplus"),
         keras.layers.Dense(5)]
    )
    x = np.random.default_rng(2).standard_normal((8, 6)).astype("float32")
    fn = lambda x: mlp(x, training=False)
    np.testing.assert_allclose(dg.spectral_norm_jvp(fn, x, num_iters=200).numpy(), _exact_sigma_max(fn, x), rtol=1e-3)


def test_dreg_head_matches_batch_jacobian(small_model):
    z = small_model.embed_features(tf.constant(_images(10))).numpy()
    d = z.shape[1]  # the model's head input, written out: √d·z/‖z‖ (head_input_norm="l2", the default)
    head = lambda z: l2_normalize(small_model.flow_min(tf.sqrt(float(d)) * z / tf.norm(z, axis=1, keepdims=True),
                                                       training=False))
    exact = _exact_sigma_max(head, z)
    # the √d·z/‖z‖ input leaves the top singular values close together: power iteration needs more steps
    sigma = dg.local_lipschitz_head(small_model, z, num_iters=400)
    assert sigma.shape == (10,)
    np.testing.assert_allclose(sigma, exact, rtol=1e-3)
    # the flows really were perturbed: not the plain normalisation's 1 / ||z||
    assert np.max(np.abs(exact * np.linalg.norm(z, axis=1) - 1.0)) > 1e-2


def test_network_matches_batch_jacobian(small_model):
    images = _images(4, seed=5)
    exact = _exact_sigma_max(lambda x: small_model(x, training=False), images)
    np.testing.assert_allclose(dg.local_lipschitz_network(small_model, images, num_iters=80), exact, rtol=1e-3)


def test_plain_head_is_inverse_norm():
    """``flow="none"``: the head is ``z / ||z||``, whose Jacobian ``(I - z z^T/||z||^2) / ||z||`` has norm 1/||z||."""
    z = np.random.default_rng(4).standard_normal((7, 9)).astype("float32") * 3.0
    sigma = dg.local_lipschitz_head(types.SimpleNamespace(flow_min=None), z, num_iters=5)
    np.testing.assert_allclose(sigma, 1.0 / np.linalg.norm(z, axis=1), rtol=1e-4)


def test_row_wise_results_independent_of_batch(small_model):
    """Block-diagonal Jacobian: a sample's estimate does not depend on the other samples (BN in inference mode)."""
    images = _images(6, seed=9)
    both = dg.local_lipschitz_network(small_model, images, num_iters=60)
    others = np.concatenate([_images(5, seed=10) * 0.5, images[2:3], images[::-1]])
    mixed = dg.local_lipschitz_network(small_model, others, num_iters=60)
    alone = dg.local_lipschitz_network(small_model, images[2:3], num_iters=60)
    np.testing.assert_allclose(mixed[5], both[2], rtol=2e-3)
    np.testing.assert_allclose(alone[0], both[2], rtol=2e-3)
    np.testing.assert_allclose(mixed[6:], both[::-1], rtol=2e-3)


# ----------------------------------------------------------------------------- segments and secants
def test_interpolation_points_pair_right_classes_and_lie_on_segments():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((9, 4)).astype("float32")
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3])  # class 3 is a singleton
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    sim = unit @ unit.T
    for kind in ("same", "different"):
        seg = dg.interpolation_points(z, labels, kind, t=[0.25, 0.5])
        n = len(seg.start) // 2
        assert seg.points.shape == (2 * n, 4) and seg.t.tolist() == [0.25] * n + [0.5] * n
        if kind == "same":
            assert 8 not in seg.start.tolist() and n == 8
            assert np.all(labels[seg.start] == labels[seg.end])
        else:
            assert n == 9 and np.all(labels[seg.start] != labels[seg.end])
        assert np.all(seg.start != seg.end)
        expected = z[seg.start] + seg.t[:, None] * (z[seg.end] - z[seg.start])
        np.testing.assert_allclose(seg.points, expected, rtol=1e-6, atol=1e-6)
        for i, j in zip(seg.start[:n], seg.end[:n]):  # the nearest (cosine) partner of the right kind
            ok = (labels == labels[i]) if kind == "same" else (labels != labels[i])
            ok[i] = False
            assert sim[i, j] == pytest.approx(sim[i][ok].max())


def test_interpolation_points_images_follow_feature_pairs():
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (6, 8, 8, 1)).astype("float32")
    z = rng.standard_normal((6, 5)).astype("float32")
    labels = np.array([0, 0, 1, 1, 2, 2])
    on_z = dg.interpolation_points(z, labels, "different", t=0.3)
    on_x = dg.interpolation_points(images, labels, "different", t=0.3, pair_features=z)
    np.testing.assert_array_equal(on_z.start, on_x.start)
    np.testing.assert_array_equal(on_z.end, on_x.end)
    assert on_x.points.shape == (6, 8, 8, 1)
    np.testing.assert_allclose(on_x.points, 0.7 * images[on_x.start] + 0.3 * images[on_x.end], rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dg.interpolation_points(z, labels, "same", t=1.5)


def test_secant_ratio_bounded_by_local_constants_on_segment(small_model):
    z = small_model.embed_features(tf.constant(_images(6, seed=2))).numpy()
    head = lambda z: l2_normalize(small_model.flow_min(z, training=False))
    a, b = z[:3], z[3:]
    ratio = dg.secant_ratio(head, a, b)
    assert ratio.shape == (3,) and np.all(ratio > 0)
    ts = np.linspace(0.0, 1.0, 65, dtype="float32")
    segment = (a[:, None] + ts[None, :, None] * (b - a)[:, None]).reshape(-1, z.shape[1])
    local = dg.local_lipschitz_head(small_model, segment, num_iters=60).reshape(3, len(ts))
    assert np.all(ratio <= local.max(axis=1) * (1 + 1e-3))
    # NaN for coincident points
    assert np.isnan(dg.secant_ratio(head, a[:1], a[:1])[0])


# ----------------------------------------------------------------------------- profile, summary, plot
def test_profile_keys_shapes_and_summary(small_model, tmp_path):
    images = _images(9, seed=3)
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 0])
    labels[-1] = 2  # three classes of three, no singleton
    profile = dg.lipschitz_profile(small_model, images, labels, t=[0.25, 0.75], num_iters=5, batch_size=4)
    expected = {f"{t}/{loc}" for t in dg.TARGETS for loc in dg.LOCATIONS}
    assert set(profile) == expected
    for target in dg.TARGETS:
        assert profile[f"{target}/data"].shape == (9,)
        assert profile[f"{target}/same"].shape == (18,) and profile[f"{target}/different"].shape == (18,)
        assert profile[f"{target}/same_secant"].shape == (9,) and profile[f"{target}/different_secant"].shape == (9,)
        assert all(np.all(np.isfinite(v)) and np.all(v >= 0) for k, v in profile.items())
    z = small_model.embed_features(tf.constant(images)).numpy()
    np.testing.assert_allclose(
        profile["head/data"], dg.local_lipschitz_head(small_model, z, num_iters=5, batch_size=4), rtol=1e-5
    )
    head_only = dg.lipschitz_profile(small_model, images, labels, num_iters=2, targets=("head",))
    assert set(head_only) == {f"head/{loc}" for loc in dg.LOCATIONS}

    rows = dg.summarize({"m": profile, "empty": {"head/same": np.array([np.nan])}})
    assert len(rows) == len(expected) + 1
    row = next(r for r in rows if r["profile"] == "m" and r["target"] == "network" and r["location"] == "same")
    values = profile["network/same"]
    assert row["n"] == 18 and row["max"] == pytest.approx(values.max())
    assert row["median"] == pytest.approx(np.median(values)) and row["p90"] == pytest.approx(np.percentile(values, 90))
    assert rows[-1]["n"] == 0 and np.isnan(rows[-1]["mean"])

    png = dg.plot_histograms({"a": profile, "b": head_only}, tmp_path / "h.png")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- report script
def _load_script():
    spec = importlib.util.spec_from_file_location("_script_lipschitz_report", REPO / "scripts" / "lipschitz_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_script_end_to_end(tmp_path, capsys):
    paths = []
    for name, flow in (("dreg", "realnvp"), ("pa", "none")):
        # a one-block CNN keeps the (per-model) trace of the jvp/vjp step short
        backbone = build_backbone("small_cnn", image_size=8, channels=1, weights=None, small_cnn_widths=(8,))
        model = DRegModel(num_classes=5, **{**SMALL, "backbone": backbone, "flow": flow})
        model.build((None, 8, 8, 1))
        paths.append(str(tmp_path / f"{name}.keras"))
        model.save(paths[-1])
    script = _load_script()
    out = tmp_path / "report"
    argv = [*paths, "--names", "dreg", "pa", "--dataset", "digits", "--num-samples", "20", "--num-iters", "3",
            "--output-dir", str(out)]
    assert script.main(argv) == 0
    for name in script.OUTPUTS:
        assert (out / name).is_file()
    with open(out / "lipschitz.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * len(dg.TARGETS) * len(dg.LOCATIONS)  # models x splits x targets x locations
    assert {r["model"] for r in rows} == {"dreg", "pa"} and {r["split"] for r in rows} == {"train", "test"}
    assert all(int(r["n"]) > 0 for r in rows)
    assert "| dreg | train | head |" in (out / "lipschitz.md").read_text()

    before = {n: (out / n).read_bytes() for n in script.OUTPUTS}
    assert script.main(argv) == 1  # no overwrite without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert {n: (out / n).read_bytes() for n in script.OUTPUTS} == before
    # --overwrite replaces them (one model, one split: a cheaper run)
    argv = [paths[1], "--dataset", "digits", "--split", "test", "--num-samples", "12", "--num-iters", "2",
            "--output-dir", str(out), "--overwrite"]
    assert script.main(argv) == 0
    with open(out / "lipschitz.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["model"], r["split"]) for r in rows} == {("pa", "test")}
