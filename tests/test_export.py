"""ONNX and SavedModel export of the inference path (backbone + embedding + head 1 + L2)."""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tensorflow as tf
from PIL import Image

import detreg_keras
from detreg_keras import export
from tests.conftest import load_script


def _cli(script: str) -> types.SimpleNamespace:
    """The command line behind ``scripts/<script>.py``, imported as a module (detreg_keras.deploy_cli)."""
    from detreg_keras import deploy_cli

    return types.SimpleNamespace(main=getattr(deploy_cli, f"{script}_main"))


def test_export_scripts_run_the_deploy_cli_entry_points():
    """scripts/export_*.py keep working: they are thin wrappers over the [project.scripts] functions."""
    from detreg_keras import deploy_cli

    assert load_script("export_onnx").main is deploy_cli.export_onnx_main
    assert load_script("export_saved_model").main is deploy_cli.export_saved_model_main

REPO = Path(__file__).resolve().parents[1]
SIZE, DIM = 32, 32


def make_model(flow: str = "realnvp", seed: int = 0, scale: float = 0.05) -> detreg_keras.DRegModel:
    """A small DRegModel whose zero-initialised flow output layers are perturbed (non-trivial flows)."""
    keras.utils.set_random_seed(seed)
    model = detreg_keras.DRegModel(
        num_classes=5, backbone="small_cnn", image_size=SIZE, channels=3, embedding_dim=DIM,
        num_couplings=4, hidden_units=32, flow=flow,
    )
    model(np.zeros((1, SIZE, SIZE, 3), np.float32))
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if variable.trainable and ("/out/" in variable.path or "raw_log_scale" in variable.path):
            variable.assign(rng.normal(0.0, scale, variable.shape).astype(np.float32))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """flow -> (model, onnx path, ExportResult) for realnvp, nice and none."""
    out = {}
    root = tmp_path_factory.mktemp("onnx")
    for flow in ("realnvp", "nice", "none"):
        model = make_model(flow)
        result = export.export_onnx(model, root / f"{flow}.onnx")
        out[flow] = (model, root / f"{flow}.onnx", result)
    return out


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("flow", ["realnvp", "nice", "none"])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_onnx_parity(exported, flow, batch):
    model, path, _ = exported[flow]
    images = np.random.default_rng(batch).uniform(0, 255, (batch, SIZE, SIZE, 3)).astype(np.float32)
    got = _session(path).run(["embeddings"], {"images": images})[0]
    expected = model(images, training=False).numpy()
    assert got.shape == (batch, DIM) and got.dtype == np.float32
    assert np.max(np.abs(got - expected)) <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_export_result_reports_parity(exported):
    for _, _, result in exported.values():
        assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5


def test_flows_are_not_trivial(exported):
    """The perturbed flow changes the embedding (otherwise the parity tests would not test the flow)."""
    model, _, _ = exported["realnvp"]
    images = export.sample_images(4, (SIZE, SIZE, 3))
    z = model.embed_features(images)
    plain = tf.math.l2_normalize(z, axis=-1).numpy()
    assert np.max(np.abs(model(images).numpy() - plain)) > 1e-2


def test_onnx_io_signature_and_metadata(exported):
    model, path, result = exported["realnvp"]
    proto = onnx.load(str(path))
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "images" and out.name == "embeddings"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", SIZE, SIZE, 3]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", DIM]
    meta = export.read_onnx_metadata(path)
    assert meta["model_hash"] == export.model_hash(model) == result.model_hash
    assert len(meta["model_hash"]) == 64
    assert meta["input_name"] == "images" and meta["output_name"] == "embeddings"
    assert meta["image_size"] == str(SIZE) and meta["channels"] == "3"
    assert meta["embedding_dim"] == str(DIM) and meta["input_layout"] == "NHWC"
    assert meta["detreg_version"] == detreg_keras.__version__
    assert "[0, 255]" in meta["preprocessing"]
    assert meta["opset"] == str(export.DEFAULT_OPSET) and meta["flow"] == "realnvp"
    assert proto.opset_import[0].version == export.DEFAULT_OPSET or any(
        o.version == export.DEFAULT_OPSET for o in proto.opset_import
    )
    # training-only parts are absent: no second flow (4 couplings of one head here, one tanh per coupling for the
    # log-scale bound and one more for the shift bound when it is set)
    per_coupling = 1 + (getattr(model, "shift_bound", None) is not None)
    assert export.onnx_op_counts(proto).get("Tanh", 0) == 4 * per_coupling
    assert os.stat(path).st_mode & 0o044 == 0o044  # readable by the server's user


def test_no_overwrite(exported, tmp_path):
    model, _, _ = exported["none"]
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        export.export_onnx(model, target)
    assert target.read_bytes() == b"keep me"
    export.export_onnx(model, target, overwrite=True, check=False)
    assert export.read_onnx_metadata(target)["model_hash"] == export.model_hash(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary file left


def test_parity_failure_raises_and_writes_nothing(exported, tmp_path, monkeypatch):
    model, path, _ = exported["nice"]
    other = make_model("nice", seed=1)
    with pytest.raises(export.ParityError, match="differ"):
        export.check_onnx_parity(other, path)

    def broken(*args, **kwargs):
        raise export.ParityError("onnxruntime and Keras embeddings differ by 1 > 1e-05")

    monkeypatch.setattr(export, "check_onnx_parity", broken)
    with pytest.raises(export.ParityError):
        export.export_onnx(model, tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []
    cli = _cli("export_onnx")
    assert cli.main([str(tmp_path / "m.keras"), "--output", str(tmp_path / "x.onnx")]) == 1  # missing model
    model.save(tmp_path / "m.keras")
    assert cli.main([str(tmp_path / "m.keras"), "--output", str(tmp_path / "x.onnx")]) == 2  # parity failure
    assert not (tmp_path / "x.onnx").exists()


def test_model_hash_tracks_inference_weights_only():
    model = make_model("realnvp", seed=3)
    before = export.model_hash(model)
    assert export.model_hash(model) == before
    head2 = model.flow_max.weights[0]
    head2.assign(head2.numpy() + 1.0)  # training-only head: same embeddings, same hash
    assert export.model_hash(model) == before
    kernel = model.embedding.dense.kernel
    kernel.assign(kernel.numpy() * 1.01)
    assert export.model_hash(model) != before


def test_cli_exports_run_dir_and_refuses_overwrite(exported, tmp_path, capsys):
    model, _, _ = exported["realnvp"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model.save(run_dir / "model.keras")
    cli = _cli("export_onnx")
    out = tmp_path / "model.onnx"
    assert cli.main([str(run_dir), "--output", str(out), "--opset", "15"]) == 0
    printed = capsys.readouterr().out
    assert "parity" in printed and "Transpose" in printed
    meta = export.read_onnx_metadata(out)
    assert meta["model_hash"] == export.model_hash(model)  # hash survives save/load
    assert meta["opset"] == "15"
    before = out.read_bytes()
    assert cli.main([str(run_dir), "--output", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_one_load_model_for_files_run_dirs_and_models(exported, tmp_path):
    """export.load_model passes a model through and loads files/run dirs with model.load_model's errors."""
    from detreg_keras.model import load_model as load_saved_model

    model, _, _ = exported["realnvp"]
    assert export.load_model(model) is model
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model.save(run_dir / "model.keras")
    x = np.random.default_rng(0).uniform(0, 255, (2,) + export.image_shape(model)).astype(np.float32)
    for loaded in (export.load_model(run_dir), load_saved_model(run_dir), export.load_model(run_dir / "model.keras")):
        np.testing.assert_allclose(loaded(x, training=False).numpy(), model(x, training=False).numpy(), atol=1e-6)
    assert export.load_model(run_dir).compiled is False  # inference only
    (tmp_path / "empty").mkdir()
    for load in (export.load_model, load_saved_model):
        with pytest.raises(FileNotFoundError, match="has no model.keras"):
            load(tmp_path / "empty")
        with pytest.raises(FileNotFoundError, match="No saved model at"):
            load(tmp_path / "missing.keras")
        with pytest.raises(TypeError, match="got int"):
            load(3)
        (tmp_path / "junk.keras").write_bytes(b"not a zip")
        with pytest.raises(ValueError, match="not a valid .keras archive"):
            load(tmp_path / "junk.keras")


# ----------------------------------------------------------------- SavedModel
def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _gray_model() -> detreg_keras.DRegModel:
    keras.utils.set_random_seed(5)
    model = detreg_keras.DRegModel(
        num_classes=3, backbone="small_cnn", image_size=SIZE, channels=1, embedding_dim=DIM,
        num_couplings=2, hidden_units=16, flow="realnvp",
    )
    model(np.zeros((1, SIZE, SIZE, 1), np.float32))
    return model


@pytest.fixture(scope="module")
def saved_model(exported, tmp_path_factory):
    model, _, _ = exported["realnvp"]
    base = tmp_path_factory.mktemp("serving")
    result = export.export_saved_model(model, base, "detreg", 1)
    return model, base, result


@pytest.fixture(scope="module")
def gray_saved_model(tmp_path_factory):
    """A 1-channel model (as the digits/Omniglot presets train) exported for TF Serving."""
    model = _gray_model()
    base = tmp_path_factory.mktemp("serving_gray")
    return model, export.export_saved_model(model, base, "gray", 1)


def _tf1_session_run(version_dir: Path, requests: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
    """What TF Serving's SavedModelBundle does: restore graph + variables into a TF1 session, run signatures."""
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default(), v1.Session(graph=graph) as session:
        meta_graph = v1.saved_model.loader.load(session, ["serve"], str(version_dir))
        out = []
        for name, array in requests:
            signature = meta_graph.signature_def[name]
            out.append(session.run(signature.outputs["embeddings"].name, {signature.inputs["images"].name: array}))
    return out


def _legacy_export(model, version_dir: Path) -> None:
    """The export of detreg-keras <= 0.1.0: tf.saved_model.save of a tf.Module tracking the Keras 3 layers."""
    module = tf.Module()
    module.layers = [model.backbone, model.embedding, model.flow_min]
    module.serve = tf.function(
        lambda images: {"embeddings": model(images, training=False)},
        input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32, name="images")],
    )
    tf.saved_model.save(module, str(version_dir), signatures={"serving_pixels": module.serve.get_concrete_function()})


def test_saved_model_layout_and_refusal(saved_model):
    model, base, result = saved_model
    assert result.path == base / "detreg" / "1"
    assert (result.path / "saved_model.pb").is_file() and (result.path / "variables").is_dir()
    assert sorted(p.name for p in (base / "detreg").iterdir()) == ["1"]  # no temporary folder left
    meta = export.read_saved_model_metadata(result.path)
    assert meta["model_hash"] == export.model_hash(model)
    assert result.max_abs_diff <= 1e-5
    with pytest.raises(FileExistsError):
        export.export_saved_model(model, base, "detreg", 1)
    with pytest.raises(ValueError):
        export.export_saved_model(model, base, "detreg", 0)
    cli = _cli("export_saved_model")
    assert cli.main([str(base / "missing.keras"), "--base-dir", str(base), "--name", "detreg", "--version", "1"]) == 1


def test_saved_model_holds_only_the_inference_variables(saved_model):
    """Every inference variable is saved (and restorable), head 2 / proxies / optimizer state are not."""
    model, _, result = saved_model
    saved = tf.train.list_variables(str(result.path / "variables" / "variables"))
    sizes = sorted(int(np.prod(shape)) for name, shape in saved if "OPTIMIZER_SLOT" not in name and shape)
    expected = sorted(int(np.prod(v.shape)) for v in export.inference_variables(model) if v.shape)
    assert sizes == expected


@pytest.mark.parametrize("batch", [1, 5])
def test_saved_model_runs_under_the_tf_serving_session_loader(saved_model, batch):
    """Both signatures, restored into a TF1 session as TF Serving does, reproduce Keras (the old export
    failed here with 'Could not find variable ...')."""
    model, _, result = saved_model
    pixels = np.random.default_rng(batch).integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)
    expected = model(pixels.astype(np.float32), training=False).numpy()
    encoded = np.array([_png(p) for p in pixels], dtype=object)  # lossless at the model's size: same pixels
    by_pixels, by_bytes = _tf1_session_run(
        result.path, [("serving_pixels", pixels.astype(np.float32)), ("serving_default", encoded)]
    )
    assert by_pixels.shape == by_bytes.shape == (batch, DIM)
    assert np.max(np.abs(by_pixels - expected)) <= 1e-5
    assert np.max(np.abs(by_bytes - expected)) <= 1e-5


def test_legacy_export_fails_the_session_loader_and_the_parity_check(saved_model, tmp_path):
    """The Keras 3 pattern behind the bug, and that check_saved_model_parity (run by every export) catches it."""
    model, _, _ = saved_model
    _legacy_export(model, tmp_path / "legacy")
    x = np.zeros((1, SIZE, SIZE, 3), np.float32)
    assert np.all(np.isfinite(tf.saved_model.load(str(tmp_path / "legacy")).signatures["serving_pixels"](images=x)
                              ["embeddings"].numpy()))  # the TF2 loader the old tests used is fine ...
    with pytest.raises(tf.errors.FailedPreconditionError, match="Could not find variable"):
        _tf1_session_run(tmp_path / "legacy", [("serving_pixels", x)])  # ... TF Serving's loader is not
    with pytest.raises(export.ParityError, match="session loader"):
        export.check_saved_model_parity(model, tmp_path / "legacy", batch_sizes=(1,), signatures=("serving_pixels",))


def _saved_model_cli_run(version_dir: Path, signature: str, inputs: Path, outdir: Path) -> np.ndarray:
    cli = shutil.which("saved_model_cli") or str(Path(sys.executable).parent / "saved_model_cli")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [cli, "run", "--dir", str(version_dir), "--tag_set", "serve", "--signature_def", signature,
         "--inputs", f"images={inputs}", "--outdir", str(outdir)],
        capture_output=True, text=True, timeout=180, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return np.load(outdir / "embeddings.npy")


def test_saved_model_cli_run_both_signatures(saved_model, tmp_path):
    model, _, result = saved_model
    pixels = np.random.default_rng(9).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    expected = model(pixels.astype(np.float32), training=False).numpy()
    np.save(tmp_path / "pixels.npy", pixels.astype(np.float32))
    np.save(tmp_path / "png.npy", np.array([_png(p) for p in pixels], dtype=object), allow_pickle=True)
    got = _saved_model_cli_run(result.path, "serving_pixels", tmp_path / "pixels.npy", tmp_path / "out_pixels")
    assert np.max(np.abs(got - expected)) <= 1e-5
    got = _saved_model_cli_run(result.path, "serving_default", tmp_path / "png.npy", tmp_path / "out_bytes")
    assert np.max(np.abs(got - expected)) <= 1e-5


def test_saved_model_signatures_as_served(saved_model):
    model, _, result = saved_model
    loaded = tf.saved_model.load(str(result.path))
    assert set(loaded.signatures.keys()) == {"serving_default", "serving_pixels"}
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    expected = model(pixels.astype(np.float32), training=False).numpy()

    by_pixels = loaded.signatures["serving_pixels"](images=tf.constant(pixels.astype(np.float32)))
    assert set(by_pixels) == {"embeddings"}
    assert np.max(np.abs(by_pixels["embeddings"].numpy() - expected)) <= 1e-5

    # PNG at the model's size: lossless, no resize -> same pixels, same embeddings
    by_bytes = loaded.signatures["serving_default"](images=tf.constant([_png(p) for p in pixels]))
    assert set(by_bytes) == {"embeddings"}
    assert np.max(np.abs(by_bytes["embeddings"].numpy() - expected)) <= 1e-5

    # other sizes, JPEG, grayscale and RGBA are decoded, converted to RGB and resized in the graph
    big = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    gray = _png(rng.integers(0, 256, (40, 40), dtype=np.uint8))
    rgba = _png(rng.integers(0, 256, (20, 24, 4), dtype=np.uint8))
    mixed = loaded.signatures["serving_default"](images=tf.constant([_jpeg(big), gray, rgba]))["embeddings"].numpy()
    assert mixed.shape == (3, DIM) and np.all(np.isfinite(mixed))
    np.testing.assert_allclose(np.linalg.norm(mixed, axis=1), 1.0, atol=1e-5)


def _sixteen_bit_png() -> tuple[bytes, np.ndarray]:
    ramp = np.linspace(0, 65535, 48 * 40).reshape(48, 40).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    return buf.getvalue(), ramp


def test_one_decoder_everywhere(saved_model):
    """A file gives the same pixels in the Embedder/HTTP service (load_image), in the training pipeline and in
    TF Serving's graph: 16-bit PNGs scaled to 8 bits (PIL's convert("L") clipped them: mean 251 instead of 127.5),
    JPEG decoded by the same library, the same resize."""
    from detreg_keras.data.pipeline import decode_image
    from detreg_keras.retrieval import load_image

    model, _, result = saved_model
    data, ramp = _sixteen_bit_png()
    reference = (ramp // 256).astype(np.float32)  # 16 -> 8 bits as TF converts (high byte)
    np.testing.assert_array_equal(load_image(data, ramp.shape, channels=1)[..., 0], reference)
    np.testing.assert_array_equal(load_image(data, ramp.shape, channels=3), np.repeat(reference[..., None], 3, -1))
    np.testing.assert_array_equal(decode_image(tf.constant(data)).numpy(), np.repeat(reference[..., None], 3, -1))
    assert load_image(data, ramp.shape, channels=1).mean() == pytest.approx(127.5, abs=0.5)

    rng = np.random.default_rng(3)
    photo = _jpeg(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8))
    np.testing.assert_array_equal(load_image(photo, (45, 61)), decode_image(tf.constant(photo)).numpy())
    (by_bytes,) = _tf1_session_run(result.path, [("serving_default", np.array([data, photo], dtype=object))])
    pixels = np.stack([load_image(d, (SIZE, SIZE)) for d in (data, photo)])
    assert np.max(np.abs(by_bytes - model(pixels, training=False).numpy())) <= 1e-5


def test_gray_model_takes_every_format_in_both_signatures(gray_saved_model):
    """A 1-channel model's serving_default decodes BMP too (decode_image(channels=1) refuses BMP)."""
    from detreg_keras.retrieval import load_image

    model, result = gray_saved_model
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (30, 36, 3), dtype=np.uint8)
    blobs = []
    for fmt in ("BMP", "PNG", "GIF", "JPEG"):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, fmt)
        blobs.append(buf.getvalue())
    gray = rng.integers(0, 256, (2, SIZE, SIZE, 1), dtype=np.uint8)
    by_bytes, by_pixels = _tf1_session_run(
        result.path,
        [("serving_default", np.array(blobs, dtype=object)), ("serving_pixels", gray.astype(np.float32))],
    )
    pixels = np.stack([load_image(b, (SIZE, SIZE), channels=1) for b in blobs])
    assert np.max(np.abs(by_bytes - model(pixels, training=False).numpy())) <= 1e-5
    assert np.max(np.abs(by_pixels - model(gray.astype(np.float32), training=False).numpy())) <= 1e-5
    # a gray PNG stays exactly the same pixels after the RGB -> gray conversion
    np.testing.assert_array_equal(load_image(_png(gray[0, ..., 0]), (SIZE, SIZE), channels=1), gray[0])


def test_saved_model_bytes_signature_matches_embedder_resize(saved_model, exported):
    """The in-graph decode + resize and the Embedder's load_image are the same function."""
    from detreg_keras.retrieval import load_image

    model, _, result = saved_model
    loaded = tf.saved_model.load(str(result.path))
    yy, xx = np.mgrid[0:96, 0:128]
    smooth = np.stack([yy * 2.5, xx * 1.9, (yy + xx) * 1.1], -1).clip(0, 255).astype(np.uint8)
    for data in (_png(smooth), _jpeg(smooth)):
        served = loaded.signatures["serving_default"](images=tf.constant([data]))["embeddings"].numpy()[0]
        local = model(load_image(data, (SIZE, SIZE))[None], training=False).numpy()[0]
        assert np.max(np.abs(served - local)) <= 1e-5


def test_saved_model_cli_shows_signatures(saved_model):
    _, _, result = saved_model
    cli = shutil.which("saved_model_cli") or str(Path(sys.executable).parent / "saved_model_cli")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [cli, "show", "--dir", str(result.path), "--all"],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "signature_def['serving_default']" in text and "signature_def['serving_pixels']" in text
    default = text.split("signature_def['serving_default']")[1].split("signature_def[")[0]
    pixels = text.split("signature_def['serving_pixels']")[1].split("signature_def[")[0]
    assert "inputs['images']" in default and "DT_STRING" in default and "outputs['embeddings']" in default
    assert f"shape: (-1, {DIM})" in default
    assert "inputs['images']" in pixels and f"shape: (-1, {SIZE}, {SIZE}, 3)" in pixels
    assert "outputs['embeddings']" in pixels


def test_saved_model_cli_script(exported, tmp_path, capsys):
    model, _, _ = exported["nice"]
    model.save(tmp_path / "m.keras")
    cli = _cli("export_saved_model")
    args = [str(tmp_path / "m.keras"), "--base-dir", str(tmp_path / "models"), "--name", "nice", "--version", "3"]
    assert cli.main(args + ["--no-check"]) == 0
    assert (tmp_path / "models" / "nice" / "3" / "saved_model.pb").is_file()
    assert cli.main(args) == 1
    assert "already exists" in capsys.readouterr().err


# ------------------------------------------- serving/client.py vs a TF Serving stub
class _FakeTFServing:
    """Minimal TF Serving REST API over the exported SavedModel, loaded as TF Serving loads it (TF1 session).

    ``POST .../:predict`` follows TF Serving's row format: ``instances`` of
    ``{"b64": ...}`` become a ``tf.string`` batch, nested lists a float tensor, and
    the single output is returned as ``{"predictions": [[...], ...]}``.
    ``GET .../metadata`` answers the signature defs in TF Serving's JSON form
    (``{"metadata": {"signature_def": {"signature_def": {...}}}}``, proto field names).
    """

    def __init__(self, version_dir: Path, name: str, version: int):
        import base64
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from google.protobuf import json_format

        v1 = tf.compat.v1
        graph = tf.Graph()
        with graph.as_default():
            self.session = v1.Session(graph=graph)
            meta_graph = v1.saved_model.loader.load(self.session, ["serve"], str(version_dir))
        session = self.session
        signatures = dict(meta_graph.signature_def)
        metadata = {
            "model_spec": {"name": name, "version": str(version)},
            "metadata": {"signature_def": {"signature_def": {
                key: json_format.MessageToDict(sig, preserving_proto_field_name=True)
                for key, sig in signatures.items()
            }}},
        }  # fmt: skip
        prefixes = {f"/v1/models/{name}", f"/v1/models/{name}/versions/{version}"}
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.removesuffix("/metadata") not in prefixes or not self.path.endswith("/metadata"):
                    return self._reply(404, {"error": f"Servable not found for request: {self.path}"})
                self._reply(200, metadata)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                if self.path.removesuffix(":predict") not in prefixes:
                    return self._reply(404, {"error": f"Servable not found for request: {self.path}"})
                signature = signatures[body.get("signature_name", "serving_default")]
                instances = body["instances"]
                if instances and isinstance(instances[0], dict):
                    array = np.array([base64.b64decode(i["b64"]) for i in instances], dtype=object)
                else:
                    array = np.asarray(instances, np.float32)
                images = signature.inputs["images"]
                expected = [d.size for d in images.tensor_shape.dim]
                if array.ndim != len(expected) or any(e > 0 and e != g for e, g in zip(expected, array.shape)):
                    return self._reply(400, {"error": f"input shape {list(array.shape)} != {expected}"})
                feed = {images.name: array}
                out = session.run(signature.outputs["embeddings"].name, feed)
                self._reply(200, {"predictions": out.tolist()})

            def _reply(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
        self.session.close()


def _load_client():
    spec = importlib.util.spec_from_file_location("_serving_client", REPO / "serving" / "client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serving_client_rest_against_stub(saved_model, tmp_path, capsys):
    model, _, result = saved_model
    client = _load_client()
    pixels = np.random.default_rng(4).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    files = []
    for i, p in enumerate(pixels):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(_png(p))
    expected = model(pixels.astype(np.float32), training=False).numpy()
    assert client.rest_payload([b"ab"]) == {"signature_name": "serving_default", "instances": [{"b64": "YWI="}]}
    assert client.predict_url("http://h:8501/", "detreg", 2) == "http://h:8501/v1/models/detreg/versions/2:predict"
    with _FakeTFServing(result.path, "detreg", 1) as stub:
        got = client.rest_predict(stub.url, "detreg", [f.read_bytes() for f in files], version=1, timeout=30)
        assert np.max(np.abs(got - expected)) <= 1e-5
        got = client.rest_predict_pixels(stub.url, "detreg", pixels.astype(np.float32), timeout=30)
        assert np.max(np.abs(got - expected)) <= 1e-5
        assert stub.requests[-1][1]["signature_name"] == "serving_pixels"
        out = tmp_path / "emb.npy"
        args = ["rest", "--url", stub.url, "--model", "detreg", "--output", str(out), *map(str, files)]
        assert client.main(args) == 0
        assert '"shape": [2, 32]' in capsys.readouterr().out
        np.testing.assert_allclose(np.load(out, allow_pickle=False), expected, atol=1e-5)
        assert client.main(["rest", "--url", stub.url, "--model", "other", str(files[0])]) == 1
        assert "404" in capsys.readouterr().err


def test_serving_client_grpc_needs_serving_api(tmp_path, capsys):
    client = _load_client()
    if importlib.util.find_spec("tensorflow_serving") is not None:
        pytest.skip("tensorflow-serving-api is installed")
    (tmp_path / "a.png").write_bytes(_png(np.zeros((4, 4, 3), np.uint8)))
    assert client.main(["grpc", "--target", "127.0.0.1:1", str(tmp_path / "a.png")]) == 2
    assert "pip install tensorflow-serving-api" in capsys.readouterr().err


def test_serving_client_pixels_follow_the_served_channels(gray_saved_model, tmp_path, capsys):
    """--pixels sends the size and channels the served signature declares (it always sent 3 channels)."""
    model, result = gray_saved_model
    client = _load_client()
    rgb = np.random.default_rng(6).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    path.write_bytes(_png(rgb))
    from detreg_keras.retrieval import load_image

    expected = model(load_image(path, (SIZE, SIZE), channels=1)[None], training=False).numpy()
    out = tmp_path / "emb.npy"
    with _FakeTFServing(result.path, "gray", 1) as stub:
        assert client.rest_pixels_shape(stub.url, "gray") == (SIZE, SIZE, 1)
        assert client.main(["rest", "--url", stub.url, "--model", "gray", "--pixels", "--output", str(out),
                            str(path)]) == 0, capsys.readouterr().err
        assert np.asarray(stub.requests[-1][1]["instances"]).shape == (1, SIZE, SIZE, 1)
        np.testing.assert_allclose(np.load(out), expected, atol=1e-5)
        # by bytes, the server decodes: same embedding
        np.testing.assert_allclose(client.rest_predict(stub.url, "gray", [path.read_bytes()]), expected, atol=1e-5)
        # an explicit --channels 3 is sent as asked, and the server's 400 is one error line
        assert client.main(["rest", "--url", stub.url, "--model", "gray", "--pixels", "--channels", "3",
                            str(path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: HTTP 400") and "Traceback" not in err
        assert client.main(["rest", "--url", stub.url, "--model", "nope", "--pixels", str(path)]) == 1
        assert "404" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["export_onnx", "export_saved_model"])
def test_export_clis_report_damaged_models_in_one_line(exported, tmp_path, capsys, script):
    """A truncated .keras was reported as "File not found" (it exists), a zip without config.json as a KeyError."""
    import zipfile

    model, _, _ = exported["none"]
    good = tmp_path / "good.keras"
    model.save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.keras").write_bytes(data[: len(data) * 6 // 10])
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tmp_path / "noconfig.keras", "w") as dst:
        for name in src.namelist():
            if name != "config.json":
                dst.writestr(name, src.read(name))
    cli = _cli(script)
    for name, fragment in (("truncated.keras", "truncated"), ("noconfig.keras", "no config.json")):
        target = ["--output", str(tmp_path / "m.onnx")] if script == "export_onnx" else [
            "--base-dir", str(tmp_path / "models"), "--name", "m", "--version", "1"]
        assert cli.main([str(tmp_path / name), *target]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
        assert "File not found" not in err


def _png_variants(size: int = SIZE) -> dict[str, bytes]:
    """8-bit PNGs of every colour type, interlaced, with a tRNS colour key, with palette transparency."""
    rng = np.random.default_rng(8)
    rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = {}

    def save(name, image, **kwargs):
        buf = io.BytesIO()
        image.save(buf, "PNG", **kwargs)
        out[name] = buf.getvalue()

    save("gray", Image.fromarray(rgb[..., 0]))
    save("gray_alpha", Image.fromarray(rgb).convert("LA"))
    save("rgb", Image.fromarray(rgb))
    save("rgba", Image.fromarray(np.dstack([rgb, rgb[..., :1]])))
    save("palette", Image.fromarray(rgb).convert("P"))
    save("palette_transparent", Image.fromarray(rgb).convert("P"), transparency=3)
    save("rgb_colour_key", Image.fromarray(rgb), transparency=(10, 20, 30))
    return out


@pytest.mark.parametrize("channels", [1, 3])
def test_runtime_decoder_is_bit_identical_to_the_graph_decoder_on_png_variants(channels):
    """Every PNG variant (colour key, palette transparency...) gives the SavedModel decoder's pixels, at the
    model's size and resized (the numpy/PIL decoder of detreg_runtime, no TensorFlow)."""
    from detreg_runtime.imaging import load_image

    for size in ((SIZE, SIZE), (SIZE - 7, SIZE + 5)):
        shape = (*size, channels)
        graph = tf.function(lambda data, shape=shape: export.decode_image_tensor(data, shape),
                            input_signature=[tf.TensorSpec([], tf.string)])  # fmt: skip
        for name, data in _png_variants().items():
            np.testing.assert_array_equal(load_image(data, size, channels), graph(tf.constant(data)).numpy(),
                                          err_msg=f"{name} {size}")  # fmt: skip
