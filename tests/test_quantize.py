"""Opt-in int8 ONNX export with a recall guard (detreg_keras.quantize) and the threshold in the ONNX metadata."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from detreg_keras import deploy_cli, export
from detreg_keras.quantize import (
    QuantizationError,
    default_quantized_path,
    quantize_onnx,
)
from detreg_runtime.embedder import Embedder
from detreg_runtime.index import EmbeddingIndex
from tests.test_export import SIZE, make_model

SHAPE = (SIZE, SIZE, 3)
FAST = {"latency_batch_sizes": (1, 4), "latency_reps": 2}


def _near_duplicates(seed: int, classes: int = 20, per_class: int = 3, noise: float = 8.0):
    """``(images, labels)``: each class is one random image and noisy copies of it (fp32 R@1 = 1)."""
    rng = np.random.default_rng(seed)
    base = np.repeat(rng.uniform(0, 255, (classes, *SHAPE)), per_class, axis=0)
    images = np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.float32)
    return images, np.repeat(np.arange(classes), per_class)


def _fp32_embeddings(path, images) -> np.ndarray:
    """Independent reference: the fp32 file run by a plain onnxruntime session."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embeddings"], {"images": images})[0]


def _recall_at_1(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Brute-force leave-one-out Recall@1 with cosine similarity."""
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return float(np.mean(labels[np.argmax(sims, axis=1)] == labels))


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """``(model, fp32 ONNX path)`` of a small realnvp DRegModel."""
    model = make_model("realnvp")
    path = tmp_path_factory.mktemp("quant") / "model.onnx"
    export.export_onnx(model, path, extra_metadata=export.threshold_metadata(0.42))
    return model, path


@pytest.fixture(scope="module")
def quantized(fp32):
    """``(report, eval images, eval labels)`` of a good int8 quantization of ``fp32``."""
    _, path = fp32
    calibration = np.random.default_rng(1).uniform(0, 255, (32, *SHAPE)).astype(np.float32)
    images, labels = _near_duplicates(2)
    return quantize_onnx(path, default_quantized_path(path), calibration, images, labels, **FAST), images, labels


def test_int8_embeddings_match_fp32_onnxruntime(quantized, fp32):
    """int8 vs fp32 onnxruntime: measured max |diff| 0.015, min cosine 0.9997 (bound 0.05 / 0.998)."""
    report, images, labels = quantized
    reference = _fp32_embeddings(fp32[1], images)
    got = _fp32_embeddings(report.path, images)  # a plain session of the int8 file
    assert got.shape == reference.shape and got.dtype == np.float32
    diff = float(np.max(np.abs(got - reference)))
    assert 0 < diff <= 0.05  # lossy, but close
    cosine = np.sum(got * reference, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.998
    assert report.max_abs_diff == pytest.approx(diff, rel=1e-5)
    assert report.min_cosine == pytest.approx(float(cosine.min()), abs=1e-6)
    assert report.r1_fp32 == pytest.approx(_recall_at_1(reference, labels)) == 1.0
    assert report.r1_int8 == pytest.approx(_recall_at_1(got, labels))
    assert report.r1_drop_points <= report.max_r1_drop == 0.2


def test_int8_file_is_quantized_and_keeps_provenance(quantized, fp32):
    import onnx

    report, images, _ = quantized
    ops = export.onnx_op_counts(report.path)
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0
    assert report.path.name == "model.int8.onnx" and fp32[1].is_file()
    meta, source = export.read_onnx_metadata(report.path), export.read_onnx_metadata(fp32[1])
    assert meta["source_model_hash"] == source["model_hash"] == export.model_hash(fp32[0])
    assert meta["model_hash"] == source["model_hash"] + "+int8"
    assert meta["image_height"] == str(SIZE) and "int8" in meta["quantization"]
    onnx.checker.check_model(str(report.path))
    embedder = Embedder(report.path, providers=["CPUExecutionProvider"])  # the runtime serves it
    np.testing.assert_allclose(embedder.embed(images[:5]), _fp32_embeddings(report.path, images[:5]), atol=1e-6)
    assert set(report.latency_ms) == {1, 4} and all(v > 0 for v in report.speedup.values())


def test_guard_refuses_a_lossy_model_and_writes_nothing(fp32, tmp_path):
    """All-black calibration images give wrong activation ranges: R@1 collapses, the guard refuses."""
    images, labels = _near_duplicates(3)
    out = tmp_path / "lossy.int8.onnx"
    black = np.zeros((4, *SHAPE), np.float32)
    with pytest.raises(QuantizationError, match=r"Recall@1 .* vs fp32 100\.00: a drop of .* > tolerance 0"):
        quantize_onnx(fp32[1], out, black, images, labels, max_r1_drop=0.0, **FAST)
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left


def test_guard_tolerance_must_be_non_negative(fp32, tmp_path):
    images, labels = _near_duplicates(4)
    with pytest.raises(ValueError, match="max_r1_drop .* must be >= 0"):
        quantize_onnx(fp32[1], tmp_path / "q.onnx", images, images, labels, max_r1_drop=-0.1)


def test_never_overwrites(fp32, quantized, tmp_path):
    images, labels = _near_duplicates(5)
    existing = tmp_path / "q.onnx"
    existing.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="never overwrites"):
        quantize_onnx(fp32[1], existing, images, images, labels)
    assert existing.read_bytes() == b"keep me"
    before = fp32[1].read_bytes()
    with pytest.raises(ValueError, match="must not replace the fp32 model"):
        quantize_onnx(fp32[1], fp32[1], images, images, labels)
    assert fp32[1].read_bytes() == before


@pytest.mark.parametrize("calibration", [None, np.zeros((0, *SHAPE), np.float32)])
def test_no_calibration_data_is_a_clear_error(fp32, tmp_path, calibration):
    images, labels = _near_duplicates(6)
    with pytest.raises(ValueError, match="needs calibration images"):
        quantize_onnx(fp32[1], tmp_path / "q.onnx", calibration, images, labels)
    with pytest.raises(ValueError, match=r"calibration images must have shape \[N, 32, 32, 3\]"):
        quantize_onnx(fp32[1], tmp_path / "q.onnx", images[:, :16], images, labels)
    assert list(tmp_path.iterdir()) == []


def test_threshold_round_trips_through_the_onnx_metadata(fp32):
    _, path = fp32
    embedder = Embedder(path, providers=["CPUExecutionProvider"])
    assert embedder.threshold == 0.42
    images, _ = _near_duplicates(7, classes=4, per_class=2)
    gallery = embedder.embed(images[::2])
    index = EmbeddingIndex(embedder.model_hash).build(gallery, labels=[f"c{i}" for i in range(4)])
    queries = images[1::2]
    scores = np.max(embedder.embed(queries) @ gallery.T, axis=1)
    matches = embedder.match(queries, index)  # no threshold given, none in the index: the model's
    assert matches.threshold == 0.42
    np.testing.assert_array_equal(matches.matched, scores >= 0.42)
    assert embedder.match(queries, index.set_threshold(0.9)).threshold == 0.9  # the index's wins
    assert embedder.match(queries, index, threshold=0.1).threshold == 0.1  # an explicit one wins
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        export.threshold_metadata(1.5)


def _write_folder(root, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.round().astype(np.uint8)).save(root / f"c{label}" / f"{i}.png")


def test_cli_quantize_and_threshold(fp32, tmp_path, capsys):
    model, _ = fp32
    model.save(tmp_path / "m.keras")
    images, labels = _near_duplicates(8)
    _write_folder(tmp_path / "cal", *_near_duplicates(9, classes=8))
    _write_folder(tmp_path / "eval", images, labels)
    out = tmp_path / "m.onnx"
    base = [str(tmp_path / "m.keras"), "--output", str(out)]
    assert deploy_cli.export_onnx_main([*base, "--quantize", "int8", "--eval-dir", str(tmp_path / "eval")]) == 1
    assert "needs calibration images: pass --calibration-dir" in capsys.readouterr().err
    assert not out.exists()
    args = [*base, "--quantize", "int8", "--calibration-dir", str(tmp_path / "cal"),
            "--eval-dir", str(tmp_path / "eval"), "--threshold", "0.3"]  # fmt: skip
    assert deploy_cli.export_onnx_main(args) == 0
    printed = capsys.readouterr().out
    assert "m.int8.onnx" in printed and "Recall@1 100.00 ->" in printed and "batch 32" in printed
    assert Embedder(tmp_path / "m.int8.onnx", providers=["CPUExecutionProvider"]).threshold == 0.3
    int8_before = (tmp_path / "m.int8.onnx").read_bytes()
    assert deploy_cli.export_onnx_main([*args, "--overwrite"]) == 1  # the int8 file is never replaced
    assert "never overwrites" in capsys.readouterr().err
    assert (tmp_path / "m.int8.onnx").read_bytes() == int8_before
