"""The TensorFlow-free runtime: imports, start-up, a real service process, and the request-size setting.

The ONNX model here is built with ``onnx.helper`` (flatten, a fixed projection, L2
normalisation), so nothing in this file needs TensorFlow either.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
onnx = pytest.importorskip("onnx")

from detreg_runtime.embedder import Embedder  # noqa: E402
from detreg_runtime.index import EmbeddingIndex  # noqa: E402
from detreg_runtime.service import ServerThread, ServiceLimits, build_parser, create_app  # noqa: E402
from tests.image_corpus import encode  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE, DIM = 8, 4
HEAVY = ("tensorflow", "keras", "tensorflow_probability", "tf2onnx")


def tiny_onnx(path: Path, seed: int = 0) -> Path:
    """``images [N, 8, 8, 3] float32 -> embeddings [N, 4]``: flatten, a seeded projection, L2 normalisation."""
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(seed).normal(size=(SIZE * SIZE * 3, DIM)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["proj"]),
         helper.make_node("LpNormalization", ["proj"], ["embeddings"], axis=1, p=2)],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", DIM])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"model_hash": f"tiny-{seed}", "embedding_dim": str(DIM)})
    path.write_bytes(model.SerializeToString())
    return path


def _png(array: np.ndarray) -> bytes:
    return encode(array, "PNG")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    onnx_path = tiny_onnx(root / "tiny.onnx")
    embedder = Embedder(onnx_path, batch_size=3)
    images = [_png(a) for a in np.random.default_rng(1).integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)]
    index = EmbeddingIndex(model_hash=embedder.model_hash).build(
        embedder.embed(images), ids=[f"g{i}" for i in range(6)], labels=[i % 2 for i in range(6)]
    )
    (root / "q.png").write_bytes(images[0])
    return {"onnx": onnx_path, "embedder": embedder, "images": images, "index_dir": index.save(root / "index"),
            "png": root / "q.png"}  # fmt: skip


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          check=False)  # fmt: skip


def test_runtime_imports_no_tensorflow():
    """A fresh interpreter imports every runtime module without TensorFlow, Keras, TFP or tf2onnx."""
    proc = _fresh(
        "import sys; import detreg_runtime, detreg_runtime.service, detreg_runtime.index_cli, "
        "detreg_runtime.imaging, detreg_runtime.verification, detreg_runtime.search, detreg_runtime.arrays; "
        "import onnxruntime, faiss, fastapi, uvicorn\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "assert not heavy, heavy; print('ok')"
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_embedding_and_search_import_no_tensorflow(tiny):
    """Embedding files, building, saving, loading and searching an index stay TensorFlow-free."""
    code = (
        "import sys\nfrom detreg_runtime import Embedder, EmbeddingIndex\n"
        f"e = Embedder({str(tiny['onnx'])!r})\n"
        f"i = EmbeddingIndex.load({str(tiny['index_dir'])!r}, expected_model_hash=e.model_hash)\n"
        f"q = e.embed([{str(tiny['png'])!r}, {str(tiny['png'])!r}])\n"
        "ids, labels, scores = i.search(q, 2)\n"
        f"assert not [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]\nprint(ids.shape)"
    )
    proc = _fresh(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "(2, 2)", proc.stderr[-2000:]


def test_max_images_derives_from_the_batch_size(tiny):
    """Default images per request = the embedder's batch_size (3 here); a setting overrides it; bad values 422/raise."""
    app = create_app(tiny["embedder"], tiny["index_dir"])
    payload = {"images": [base64.b64encode(b).decode() for b in tiny["images"][:4]]}
    with ServerThread(app) as running, httpx.Client(base_url=running.url, timeout=20.0) as client:
        assert client.get("/health").json()["limits"]["max_images"] == 3
        response = client.post("/embed", json=payload)
        assert response.status_code == 422 and "At most 3 images per request, got 4" in response.json()["detail"]
        payload["images"] = payload["images"][:3]
        assert client.post("/embed", json=payload).status_code == 200
    wider = create_app(tiny["embedder"], None, ServiceLimits(max_images=5))
    assert wider.state.limits["max_images"] == 5
    with pytest.raises(ValueError, match="max_images must be a positive integer"):
        create_app(tiny["embedder"], None, max_images=0)
    with pytest.raises(ValueError, match="Unknown service limits"):
        create_app(tiny["embedder"], None, max_imgs=5)


def test_search_matches_brute_force(tiny):
    """/search returns the numpy top-k of cosine similarities over the gallery."""
    embedder = tiny["embedder"]
    gallery = embedder.embed(tiny["images"])
    with ServerThread(create_app(embedder, tiny["index_dir"])) as running:
        files = [("files", ("q.png", tiny["images"][4], "image/png"))]
        hits = httpx.post(running.url + "/search?k=3", files=files, timeout=20.0).json()["results"][0]
    expected = np.argsort(-(gallery @ gallery[4]))[:3]
    assert [h["id"] for h in hits] == [f"g{i}" for i in expected]
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_cli_options():
    """--tf-threads is gone (no TensorFlow decodes images any more); the limits are options."""
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m.onnx", "--tf-threads", "1"])
    args = parser.parse_args(["--model", "m.onnx", "--max-images", "8", "--batch-size", "16"])
    assert (args.max_images, args.batch_size) == (8, 16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_service_process_starts_and_serves(tiny):
    """``python -m detreg_runtime`` in its own process: /health, /search and /match over real HTTP."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "detreg_runtime", "--model", str(tiny["onnx"]), "--index", str(tiny["index_dir"]),
         "--port", str(port), "--log-level", "warning"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the service did not start"
                time.sleep(0.1)
        assert health["index"]["count"] == 6 and health["model_hash"] == "tiny-0"
        files = [("files", ("q.png", tiny["images"][2], "image/png"))]
        hits = httpx.post(f"http://127.0.0.1:{port}/search?k=1", files=files, timeout=20.0).json()["results"]
        assert hits[0][0]["id"] == "g2"
        match = httpx.post(f"http://127.0.0.1:{port}/match?threshold=0.99", files=files, timeout=20.0).json()
        assert match["results"][0]["label"] == 0
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_entry_points_resolve():
    """The runtime's [project.scripts] name the functions that scripts/detreg_index.py and -m detreg_runtime run."""
    import importlib

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    from detreg_runtime import index_cli, service

    for name, target in (("detreg-serve", service.main), ("detreg-index", index_cli.main)):
        module, _, attr = scripts[name].partition(":")
        assert getattr(importlib.import_module(module), attr) is target
    assert scripts["detreg-export-onnx"] == "detreg_keras.deploy_cli:export_onnx_main"
    assert scripts["detreg-export-saved-model"] == "detreg_keras.deploy_cli:export_saved_model_main"
