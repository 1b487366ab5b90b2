"""onnxruntime Embedder, faiss EmbeddingIndex (exact/IVF/HNSW, save/load without pickle) and the index CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import onnx
import pytest
from PIL import Image

import detreg_keras
from detreg_keras import export
from detreg_keras.retrieval import (
    Embedder,
    EmbeddingIndex,
    list_image_folder,
    load_image,
    recall_against_exact,
)

REPO = Path(__file__).resolve().parents[1]
SIZE, DIM = 32, 16


@pytest.fixture(scope="module")
def model_and_onnx(tmp_path_factory):
    keras.utils.set_random_seed(7)
    model = detreg_keras.DRegModel(
        num_classes=4, backbone="small_cnn", image_size=SIZE, channels=3, embedding_dim=DIM,
        num_couplings=2, hidden_units=16, flow="realnvp",
    )
    model(np.zeros((1, SIZE, SIZE, 3), np.float32))
    rng = np.random.default_rng(0)
    for v in model.weights:
        if v.trainable and "/out/" in v.path:
            v.assign(rng.normal(0, 0.05, v.shape).astype(np.float32))
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    export.export_onnx(model, path)
    return model, path


@pytest.fixture(scope="module")
def embedder(model_and_onnx):
    return Embedder(model_and_onnx[1], providers=["CPUExecutionProvider"], batch_size=4)


def _png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


# ------------------------------------------------------------------ Embedder
def test_embedder_properties(embedder, model_and_onnx):
    model, _ = model_and_onnx
    assert embedder.image_size == (SIZE, SIZE) and embedder.channels == 3 and embedder.embedding_dim == DIM
    assert embedder.model_hash == export.model_hash(model)
    assert embedder.providers[-1] == "CPUExecutionProvider"
    assert embedder.metadata["input_name"] == "images"
    import onnxruntime as ort

    assert embedder.session.get_session_options().graph_optimization_level == (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )


def test_embedder_matches_keras_and_batches(embedder, model_and_onnx):
    model, _ = model_and_onnx
    pixels = np.random.default_rng(1).integers(0, 256, (11, SIZE, SIZE, 3), dtype=np.uint8)
    got = embedder.embed(pixels)  # uint8, batch_size=4 -> 3 runs
    assert got.dtype == np.float32 and got.shape == (11, DIM)
    expected = model(pixels.astype(np.float32), training=False).numpy()
    assert np.max(np.abs(got - expected)) <= 1e-5
    np.testing.assert_allclose(embedder(pixels.astype(np.float64)), got, atol=1e-6)
    np.testing.assert_allclose(embedder.embed(pixels[0]), got[:1], atol=1e-6)  # one HWC image
    np.testing.assert_allclose(embedder.embed(list(pixels[:5])), got[:5], atol=1e-6)
    assert embedder.embed([]).shape == (0, DIM)


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((2, SIZE, SIZE, 3), np.int64), "dtype int64"),
        (np.zeros((2, SIZE, SIZE, 3), bool), "dtype bool"),
        (np.zeros((SIZE, SIZE), np.uint8), "rank 2"),
        (np.zeros((1, 1, SIZE, SIZE, 3), np.uint8), "rank 5"),
        (np.zeros((2, SIZE, SIZE, 1), np.uint8), "3-channel"),
        (np.zeros((2, SIZE, SIZE, 4), np.uint8), "got 4 channels"),
        (np.zeros((2, 3, SIZE, SIZE), np.uint8), "3-channel"),  # NCHW
        (np.zeros((2, 16, SIZE, 3), np.uint8), "32x32 images, got 16x32"),
        (np.full((1, SIZE, SIZE, 3), np.nan, np.float32), "NaN"),
        (np.full((1, SIZE, SIZE, 3), -1.0, np.float32), r"\[0, 255\]"),
        (np.full((1, SIZE, SIZE, 3), 300.0, np.float32), r"\[0, 255\]"),
        ([3], "type int"),
    ],
)
def test_embedder_validation(embedder, images, message):
    with pytest.raises(ValueError, match=message):
        embedder.embed(images)


def test_embedder_warns_on_unit_scaled_pixels(embedder):
    with pytest.warns(UserWarning, match=r"\[0, 255\]"):
        embedder.embed(np.full((1, SIZE, SIZE, 3), 0.5, np.float32))


def test_embedder_image_files_and_bytes(embedder, tmp_path):
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (60, 45, 3), dtype=np.uint8)).save(tmp_path / "b.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)).save(tmp_path / "rgba.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")

    from_array = embedder.embed(pixels[None])
    np.testing.assert_allclose(embedder.embed(tmp_path / "a.png"), from_array, atol=1e-6)
    np.testing.assert_allclose(embedder.embed(str(tmp_path / "a.png")), from_array, atol=1e-6)
    np.testing.assert_allclose(embedder.embed(_png_bytes(pixels)), from_array, atol=1e-6)
    many = embedder.embed([tmp_path / n for n in ("a.png", "b.jpg", "gray.png", "rgba.png")] + [pixels])
    assert many.shape == (5, DIM) and np.all(np.isfinite(many))
    np.testing.assert_allclose(many[4], from_array[0], atol=1e-6)
    assert load_image(tmp_path / "b.jpg", (SIZE, SIZE)).shape == (SIZE, SIZE, 3)
    assert load_image(tmp_path / "gray.png", (SIZE, 20), channels=1).shape == (SIZE, 20, 1)

    with pytest.raises(ValueError, match="broken.jpg"):
        embedder.embed([tmp_path / "a.png", tmp_path / "broken.jpg"])
    with pytest.raises(ValueError, match="not found"):
        embedder.embed(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="too large"):
        load_image(tmp_path / "b.jpg", (SIZE, SIZE), max_pixels=100)


def test_embedder_optimized_model_cache(model_and_onnx, embedder, tmp_path):
    _, path = model_and_onnx
    first = Embedder(path, optimized_model_cache=tmp_path / "cache")
    cached = list((tmp_path / "cache").glob("*.onnx"))
    assert len(cached) == 1 and first.optimized_model_path == cached[0]
    second = Embedder(path, optimized_model_cache=tmp_path / "cache", intra_op_num_threads=1)
    pixels = np.random.default_rng(3).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    np.testing.assert_allclose(second.embed(pixels), embedder.embed(pixels), atol=1e-6)
    assert second.model_hash == embedder.model_hash
    cached[0].write_bytes(b"corrupt cache")  # a broken cache file is rebuilt from the source model
    third = Embedder(path, optimized_model_cache=tmp_path / "cache")
    np.testing.assert_allclose(third.embed(pixels), embedder.embed(pixels), atol=1e-6)
    assert cached[0].stat().st_size > 1000


def test_embedder_without_metadata_hashes_the_file(model_and_onnx, tmp_path):
    _, path = model_and_onnx
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    emb = Embedder(bare)
    assert emb.model_hash.startswith("onnx-sha256:") and emb.image_size == (SIZE, SIZE)
    with pytest.raises(FileNotFoundError):
        Embedder(tmp_path / "nope.onnx")


# --------------------------------------------------------------------- index
def clustered(n: int, dim: int, clusters: int, seed: int = 0, noise: float = 0.35):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    labels = rng.integers(0, clusters, n)
    x = centers[labels] + noise * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def test_flat_search_equals_bruteforce():
    x, labels = clustered(3000, 24, 30)
    q, _ = clustered(50, 24, 30, seed=1)
    index = EmbeddingIndex(model_hash="m").build(x, ids=np.arange(3000) * 10 + 5, labels=labels)
    ids, got_labels, scores = index.search(q, k=10)
    sims = q @ x.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, top * 10 + 5)
    np.testing.assert_array_equal(got_labels, labels[top])
    np.testing.assert_allclose(scores, np.take_along_axis(sims, top, 1), atol=1e-5)
    assert scores.dtype == np.float32 and np.all(np.diff(scores, axis=1) <= 1e-6)
    # one vector query, k larger than the index, string ids and labels
    small = EmbeddingIndex().build(x[:5], ids=[f"img{i}.png" for i in range(5)], labels=["a", "b", "a", "c", "b"])
    ids, lab, sc = small.search(x[2], k=50)
    assert ids.shape == (1, 5) and ids[0, 0] == "img2.png" and lab[0, 0] == "a"
    assert sc[0, 0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kind, params", [("ivf", {"nlist": 64, "nprobe": 8}), ("hnsw", {"M": 16, "efSearch": 128})])
def test_approximate_recall(kind, params):
    x, _ = clustered(8000, 32, 64)
    q, _ = clustered(200, 32, 64, seed=5)
    exact = EmbeddingIndex().build(x).search(q, 10)[0]
    approx = EmbeddingIndex().build(x, kind=kind, **params)
    ids = approx.search(q, 10)[0]
    assert recall_against_exact(ids, exact) >= 0.9
    if kind == "ivf":
        assert approx.params == {"nlist": 64, "nprobe": 8, "train_size": 3200, "niter": 10}
        full = approx.search(q, 10, nprobe=64)[0]  # probing every list is exact
        assert recall_against_exact(full, exact) == 1.0
    else:
        assert approx.params["m"] == 16 and approx.params["ef_search"] == 128


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_index_and_evaluation_build_the_same_faiss_index(kind):
    """EmbeddingIndex builds through the one faiss wrapper: byte-identical to build_faiss_index, same defaults."""
    import faiss

    from detreg_keras.metrics import build_faiss_index

    x, _ = clustered(1000, 16, 20)
    index = EmbeddingIndex().build(x, kind=kind)
    reference, params = build_faiss_index(x, kind)
    assert faiss.serialize_index(index.index).tobytes() == faiss.serialize_index(reference).tobytes()
    # defaults by hand for N = 1000: nlist = min(round(4 * sqrt(N)), N // 39) = min(126, 25)
    expected = {"flat": {}, "ivf": {"nlist": 25, "nprobe": 1, "train_size": 1000, "niter": 10},
                "hnsw": {"m": 32, "ef_construction": 40, "ef_search": 128}}[kind]  # fmt: skip
    assert index.params == params == expected


def test_ivf_unfilled_slots_are_marked():
    x, _ = clustered(400, 8, 10)
    index = EmbeddingIndex().build(x, labels=np.arange(400) % 3, kind="ivf", nlist=10, nprobe=1)
    ids, labels, scores = index.search(x[:3], k=400)
    missing = ~np.isfinite(scores)
    assert missing.any()
    assert np.all(ids[missing] == -1) and np.all(labels[missing] == -1)
    assert np.all(ids[~missing] >= 0)


def test_index_input_errors():
    x, _ = clustered(100, 8, 4)
    with pytest.raises(ValueError, match="kind"):
        EmbeddingIndex().build(x, kind="lsh")
    with pytest.raises(ValueError, match="Unknown parameter"):
        EmbeddingIndex().build(x, kind="flat", nlist=4)
    with pytest.raises(ValueError, match="unique"):
        EmbeddingIndex().build(x, ids=np.zeros(100, int))
    with pytest.raises(ValueError, match="length 100"):
        EmbeddingIndex().build(x, labels=[1, 2])
    with pytest.raises(ValueError, match="0 embeddings"):
        EmbeddingIndex().build(np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        EmbeddingIndex().build(np.full((3, 8), np.nan))
    with pytest.raises(ValueError, match="at least nlist"):
        EmbeddingIndex().build(x, kind="ivf", nlist=200)
    index = EmbeddingIndex().build(x)
    with pytest.raises(ValueError, match="dimension 7"):
        index.search(np.zeros((1, 7), np.float32), 3)
    with pytest.raises(ValueError, match="k must be"):
        index.search(x[:1], 0)
    with pytest.raises(ValueError, match="empty"):
        EmbeddingIndex().search(x[:1], 1)


def test_add_appends():
    x, _ = clustered(300, 8, 4)
    index = EmbeddingIndex().build(x[:200], kind="hnsw")
    index.add(x[200:])
    assert index.count == 300
    ids, _, _ = index.search(x[250], 1)
    assert ids[0, 0] == 250
    with pytest.raises(ValueError, match="unique"):
        index.add(x[:1], ids=[3])


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip_without_pickle(kind, tmp_path):
    x, labels = clustered(1000, 16, 10)
    names = np.array([f"class_{c}" for c in labels])
    index = EmbeddingIndex(model_hash="abc123").build(
        x, ids=[f"dir/{i}.jpg" for i in range(1000)], labels=names, kind=kind
    )
    index.extra = {"note": "test"}
    before = index.search(x[:20], 5)
    path = index.save(tmp_path / "idx")
    assert sorted(p.name for p in path.iterdir()) == ["ids.npy", "index.faiss", "labels.npy", "metadata.json"]
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["checksums"] == {  # independent reference: hashlib over the written files
        name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in ("ids.npy", "index.faiss", "labels.npy")
    }
    assert meta["dimension"] == 16 and meta["kind"] == kind and meta["count"] == 1000
    assert meta["model_hash"] == "abc123" and meta["detreg_version"] == detreg_keras.__version__
    assert meta["extra"] == {"note": "test"}
    # no pickle: plain .npy arrays readable with allow_pickle=False, no pickle stream anywhere
    assert np.load(path / "ids.npy", allow_pickle=False)[3] == "dir/3.jpg"
    assert np.load(path / "labels.npy", allow_pickle=False).dtype.kind == "U"
    for f in path.iterdir():
        assert not f.read_bytes().startswith(b"\x80"), f"{f.name} looks like a pickle"
    loaded = EmbeddingIndex.load(path, expected_model_hash="abc123", expected_dimension=16)
    assert loaded.kind == kind and loaded.count == 1000 and loaded.params == index.params
    after = loaded.search(x[:20], 5)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert list(tmp_path.iterdir()) == [path]  # no temporary folder left


def test_load_refuses_other_model_dimension_and_corruption(tmp_path):
    x, _ = clustered(50, 8, 3)
    path = EmbeddingIndex(model_hash="model-a").build(x, labels=np.arange(50)).save(tmp_path / "idx")
    with pytest.raises(ValueError, match="model-b"):
        EmbeddingIndex.load(path, expected_model_hash="model-b")
    with pytest.raises(ValueError, match="dimension 8, expected 16"):
        EmbeddingIndex.load(path, expected_model_hash="model-a", expected_dimension=16)
    with pytest.warns(UserWarning, match="expected_model_hash"):  # no expectation: loads, loudly
        assert EmbeddingIndex.load(path).model_hash == "model-a"
    with pytest.raises(FileExistsError):
        EmbeddingIndex().build(x).save(path)
    EmbeddingIndex(model_hash="model-c").build(x).save(path, overwrite=True)
    assert EmbeddingIndex.load(path, expected_model_hash="model-c").labels is None
    meta = json.loads((path / "metadata.json").read_text())
    meta["count"] = 49
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="inconsistent"):
        EmbeddingIndex.load(path, expected_model_hash="model-c")
    with pytest.raises(FileNotFoundError):
        EmbeddingIndex.load(tmp_path / "nothing")


def _saved_pair(tmp_path):
    """Two saved indexes of the same shape (same model hash, different embeddings) and their data."""
    x, labels = clustered(60, 8, 3)
    a = EmbeddingIndex(model_hash="m").build(x, ids=np.arange(60) + 100, labels=labels).save(tmp_path / "a")
    b = EmbeddingIndex(model_hash="m").build(x[::-1].copy(), ids=np.arange(60) + 100, labels=labels[::-1].copy())
    return a, b.save(tmp_path / "b"), x


@pytest.mark.parametrize("damage", ["reordered ids", "replaced index", "replaced labels", "truncated index"])
def test_load_refuses_files_changed_after_save(tmp_path, damage):
    """A replaced / reordered / truncated file used to load and return wrong ids without a warning."""
    a, b, x = _saved_pair(tmp_path)
    ids = np.load(a / "ids.npy")
    if damage == "reordered ids":
        np.save(a / "ids.npy", ids[::-1].copy(), allow_pickle=False)
    elif damage == "replaced index":
        shutil.copy(b / "index.faiss", a / "index.faiss")
    elif damage == "replaced labels":
        shutil.copy(b / "labels.npy", a / "labels.npy")
    else:
        data = (a / "index.faiss").read_bytes()
        (a / "index.faiss").write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(ValueError, match="checksum"):
        EmbeddingIndex.load(a, expected_model_hash="m")


def test_load_of_a_format_1_index_warns_and_reports_a_truncated_faiss_file(tmp_path):
    a, _, x = _saved_pair(tmp_path)
    meta = json.loads((a / "metadata.json").read_text())
    del meta["checksums"]
    meta["format_version"] = 1
    (a / "metadata.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="no checksums"):
        assert EmbeddingIndex.load(a, expected_model_hash="m").search(x[5], 1)[0][0, 0] == 105
    data = (a / "index.faiss").read_bytes()
    (a / "index.faiss").write_bytes(data[: len(data) * 6 // 10])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="not a readable faiss index"):
        EmbeddingIndex.load(a, expected_model_hash="m")


@pytest.mark.parametrize("name", ["../outside.npy", "/etc/passwd", "sub/labels.npy", "..", 3])
def test_load_keeps_every_file_inside_the_folder(tmp_path, name):
    a, _, _ = _saved_pair(tmp_path)
    np.save(tmp_path / "outside.npy", np.arange(60), allow_pickle=False)  # readable, the right length
    meta = json.loads((a / "metadata.json").read_text())
    meta["files"]["labels"] = name
    (a / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="plain file name"):
        EmbeddingIndex.load(a, expected_model_hash="m")


def test_load_refuses_a_symlink_out_of_the_folder(tmp_path):
    a, _, _ = _saved_pair(tmp_path)
    np.save(tmp_path / "outside.npy", np.load(a / "labels.npy"), allow_pickle=False)
    (a / "labels.npy").unlink()
    (a / "labels.npy").symlink_to(tmp_path / "outside.npy")
    with pytest.raises(ValueError, match="outside the index folder"):
        EmbeddingIndex.load(a, expected_model_hash="m")


# ----------------------------------------------------------------------- CLI
def _image_folder(root: Path) -> dict[str, list[Path]]:
    """Two classes of distinct colours, 3 images each, mixed formats and sizes."""
    rng = np.random.default_rng(0)
    out = {}
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 40, 210))):
        (root / name / "sub").mkdir(parents=True)
        files = []
        for i in range(3):
            img = np.clip(np.array(colour) + rng.normal(0, 20, (SIZE + 8 * i, SIZE, 3)), 0, 255).astype(np.uint8)
            path = root / name / ("sub" if i == 2 else "") / f"{name}{i}.{'png' if i else 'jpg'}"
            Image.fromarray(img).save(path)
            files.append(path)
        out[name] = files
    (root / "red" / "notes.txt").write_text("ignored")
    (root / ".hidden").mkdir()
    return out


def test_list_image_folder(tmp_path):
    files = _image_folder(tmp_path)
    paths, labels = list_image_folder(tmp_path)
    assert len(paths) == 6 and labels == ["blue"] * 3 + ["red"] * 3
    assert set(paths) == set(files["red"] + files["blue"])
    with pytest.raises(ValueError, match="No images"):
        list_image_folder(tmp_path / "red" / "sub")


def test_cli_build_and_search(model_and_onnx, embedder, tmp_path, capsys):
    _, onnx_path = model_and_onnx
    files = _image_folder(tmp_path / "images")
    out = tmp_path / "index"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "detreg_index.py"), "build", "--model", str(onnx_path),
         "--images", str(tmp_path / "images"), "--output", str(out), "--kind", "hnsw"],
        capture_output=True, text=True, timeout=180, env=env, cwd=REPO, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "indexed 6 images of 2 classes" in proc.stdout
    index = EmbeddingIndex.load(out, expected_model_hash=embedder.model_hash)
    assert index.kind == "hnsw" and sorted(set(index.labels)) == ["blue", "red"]
    assert "red/sub/red2.png" in set(index.ids)

    from detreg_runtime import index_cli as cli
    query = files["red"][1]
    assert cli.main(["search", "--index", str(out), "--model", str(onnx_path), str(query), "--k", "3", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    top = result["results"][0]
    assert top["id"] == "red/red1.png" and top["label"] == "red" and top["score"] == pytest.approx(1.0, abs=1e-5)
    assert len(result["results"]) == 3
    assert cli.main(["search", "--index", str(out), "--model", str(onnx_path), str(query), str(files["blue"][0])]) == 0
    assert "red/red1.png" in capsys.readouterr().out

    # refusals: existing output, other model's index, unreadable image
    assert cli.main(["build", "--model", str(onnx_path), "--images", str(tmp_path / "images"),
                     "--output", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    meta = json.loads((out / "metadata.json").read_text())
    meta["model_hash"] = "another-model"
    (out / "metadata.json").write_text(json.dumps(meta))
    assert cli.main(["search", "--index", str(out), "--model", str(onnx_path), str(query)]) == 2
    assert "another-model" in capsys.readouterr().err
    (tmp_path / "images" / "red" / "bad.png").write_bytes(b"not an image")
    args = ["build", "--model", str(onnx_path), "--images", str(tmp_path / "images"), "--output", str(tmp_path / "i2")]
    assert cli.main(args) == 1
    assert "bad.png" in capsys.readouterr().err
    assert cli.main(args + ["--skip-bad-images", "--kind", "ivf", "--nlist", "2"]) == 0
    assert EmbeddingIndex.load(tmp_path / "i2", expected_model_hash=embedder.model_hash).count == 6


def test_embedder_names_a_file_that_is_not_onnx(tmp_path):
    """A .keras archive (or any non-ONNX file) gave onnxruntime's protobuf traceback."""
    keras_file = tmp_path / "model.keras"
    keras_file.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(ValueError, match=r"zip archive \(a \.keras model\?\).*export_onnx\.py"):
        Embedder(keras_file)
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"not a protobuf at all" * 4)
    with pytest.raises(ValueError, match="not an ONNX model onnxruntime can load"):
        Embedder(garbage)


def test_cli_expected_failures_are_one_error_line(model_and_onnx, embedder, tmp_path, capsys):
    _, onnx_path = model_and_onnx
    from detreg_runtime import index_cli as cli
    _image_folder(tmp_path / "images")
    keras_file = tmp_path / "model.keras"
    keras_file.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    (tmp_path / "empty" / "cls").mkdir(parents=True)

    def one_line(code, argv, *fragments):
        assert cli.main(argv) == code
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        for fragment in fragments:
            assert fragment in err, err

    build = ["build", "--model", str(onnx_path), "--output", str(tmp_path / "idx")]
    one_line(1, ["build", "--model", str(keras_file), "--images", str(tmp_path / "images"), "--output",
                 str(tmp_path / "x")], "export_onnx.py")  # fmt: skip
    one_line(1, [*build, "--images", str(tmp_path / "empty")], "No images")
    one_line(1, [*build, "--images", str(tmp_path / "missing")], "not found")
    assert cli.main([*build, "--images", str(tmp_path / "images")]) == 0
    query = str(next((tmp_path / "images" / "red").glob("*.png")))
    one_line(1, ["search", "--index", str(tmp_path / "idx"), "--model", str(keras_file), query], "export_onnx.py")
    ids = np.load(tmp_path / "idx" / "ids.npy")
    np.save(tmp_path / "idx" / "ids.npy", ids[::-1].copy(), allow_pickle=False)  # reordered ids
    one_line(2, ["search", "--index", str(tmp_path / "idx"), "--model", str(onnx_path), query], "checksum")
