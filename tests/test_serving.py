"""The HTTP retrieval service, against a real uvicorn server on 127.0.0.1 (bounded timeouts)."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import detreg_keras  # noqa: E402
from detreg_keras import export  # noqa: E402
from detreg_keras.retrieval import Embedder, EmbeddingIndex  # noqa: E402
from detreg_keras.serving import DEFAULT_MAX_REQUEST_BYTES, ServerThread, create_app  # noqa: E402
from tests.image_corpus import encode  # noqa: E402

SIZE, DIM = 32, 16
TIMEOUT = httpx.Timeout(20.0)


def _png(array: np.ndarray) -> bytes:
    return encode(array, "PNG")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    keras.utils.set_random_seed(11)
    model = detreg_keras.DRegModel(
        num_classes=3, backbone="small_cnn", image_size=SIZE, channels=3, embedding_dim=DIM,
        num_couplings=2, hidden_units=16, flow="nice",
    )
    model(np.zeros((1, SIZE, SIZE, 3), np.float32))
    rng = np.random.default_rng(0)
    for v in model.weights:
        if v.trainable and ("/out/" in v.path or "raw_log_scale" in v.path):
            v.assign(rng.normal(0, 0.05, v.shape).astype(np.float32))
    root = tmp_path_factory.mktemp("svc")
    onnx_path = root / "model.onnx"
    export.export_onnx(model, onnx_path)
    embedder = Embedder(onnx_path)
    gallery = rng.integers(0, 256, (12, SIZE, SIZE, 3), dtype=np.uint8)
    images = [_png(g) for g in gallery]
    index = EmbeddingIndex(model_hash=embedder.model_hash).build(
        embedder.embed(images), ids=[f"g{i}.png" for i in range(12)], labels=[f"c{i % 3}" for i in range(12)]
    )
    index_dir = index.save(root / "index")
    return {"onnx": onnx_path, "embedder": embedder, "images": images, "index_dir": index_dir, "index": index}


@pytest.fixture(scope="module")
def server(assets):
    app = create_app(assets["embedder"], assets["index_dir"])  # default 10 MiB body limit
    with ServerThread(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


def test_real_server_health(server, client, assets):
    assert server.url.startswith("http://127.0.0.1:")
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["model_hash"] == assets["embedder"].model_hash
    assert body["embedding_dim"] == DIM and body["image_size"] == [SIZE, SIZE]
    assert body["index"]["count"] == 12 and body["index"]["kind"] == "flat"


def test_embed_multipart_and_json(client, assets):
    images, embedder = assets["images"], assets["embedder"]
    expected = embedder.embed(images[:3])
    files = [("files", (f"{i}.png", images[i], "image/png")) for i in range(3)]
    response = client.post("/embed", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == 3 and body["dimension"] == DIM and body["model_hash"] == embedder.model_hash
    np.testing.assert_allclose(np.array(body["embeddings"], np.float32), expected, atol=1e-6)

    b64 = [base64.b64encode(img).decode() for img in images[:3]]
    for payload in (
        {"images": b64},
        {"instances": [{"b64": s} for s in b64]},  # TF Serving's REST form
        {"images": [f"data:image/png;base64,{s}" for s in b64]},
    ):
        response = client.post("/embed", json=payload)
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(np.array(response.json()["embeddings"], np.float32), expected, atol=1e-6)


def test_search_json_and_multipart(client, assets):
    images = assets["images"]
    payload = {"images": [base64.b64encode(images[4]).decode(), base64.b64encode(images[7]).decode()], "k": 3}
    response = client.post("/search", json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["k"] == 3 and len(body["results"]) == 2
    first = body["results"][0]
    assert [hit["rank"] for hit in first] == [1, 2, 3]
    assert first[0]["id"] == "g4.png" and first[0]["label"] == "c1"
    assert first[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert body["results"][1][0]["id"] == "g7.png"

    response = client.post("/search?k=2", files=[("file", ("q.png", images[5], "image/png"))])
    assert response.status_code == 200, response.text
    (hits,) = response.json()["results"]
    assert len(hits) == 2 and hits[0]["id"] == "g5.png"
    response = client.post("/search", files=[("file", ("q.png", images[5], "image/png"))], data={"k": "4"})
    assert len(response.json()["results"][0]) == 4
    response = client.post("/search", json={"images": payload["images"][:1]})  # default k
    assert len(response.json()["results"][0]) == 5


def test_oversized_body_is_413(client):
    too_big = b"\0" * (DEFAULT_MAX_REQUEST_BYTES + 1)
    response = client.post("/embed", content=too_big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]
    response = client.post("/search", files=[("file", ("big.png", too_big, "image/png"))])
    assert response.status_code == 413

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(11):
            yield b"\0" * (1024 * 1024)

    response = client.post("/embed", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize(
    "kwargs, status, message",
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "Malformed JSON"),
        ({"json": {"images": ["***not base64***"]}}, 400, "not valid base64"),
        ({"json": {"images": [base64.b64encode(b"plain text, not an image").decode()]}}, 422, "Image 0"),
        ({"json": {"images": [""]}}, 422, "empty"),
        ({"json": {"pictures": []}}, 422, '"images"'),
        ({"json": {"images": "abc"}}, 422, "must be a list"),
        ({"json": ["abc"]}, 422, "object"),
        ({"json": {"images": [{"url": "http://x"}]}}, 400, "b64"),
        ({"json": {"images": []}}, 422, "No image"),
        ({"json": {"images": ["AAAA"] * 65}}, 422, "At most 64"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "Unsupported content type"),
    ],
)
def test_malformed_requests_are_4xx_with_message(client, kwargs, status, message):
    response = client.post("/embed", **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


@pytest.mark.parametrize("k", [0, -1, 101, "abc", 2.5, True, "²", " 1 2"])
def test_bad_k_is_422(client, assets, k):
    payload = {"images": [base64.b64encode(assets["images"][0]).decode()], "k": k}
    response = client.post("/search", json=payload)
    assert response.status_code == 422
    assert "k must" in response.json()["detail"]


def test_without_index_search_is_503_and_wrong_index_refused(assets, tmp_path):
    payload = {"images": [base64.b64encode(assets["images"][0]).decode()]}
    with ServerThread(create_app(assets["embedder"], None)) as running, httpx.Client(
        base_url=running.url, timeout=TIMEOUT
    ) as c:
        assert c.post("/search", json=payload).status_code == 503
        assert c.post("/embed", json=payload).status_code == 200
        assert c.get("/health").json()["index"] is None
    other = EmbeddingIndex(model_hash="another-model").build(np.eye(DIM, dtype=np.float32))
    with pytest.raises(ValueError, match="another-model"):
        create_app(assets["embedder"], other)
    with pytest.raises(ValueError, match="another-model"):
        create_app(assets["embedder"], other.save(tmp_path / "other"))


def test_concurrent_requests(client, assets):
    from concurrent.futures import ThreadPoolExecutor

    payload = {"images": [base64.b64encode(assets["images"][i]).decode() for i in range(4)], "k": 1}

    def call(_):
        return client.post("/search", json=payload).json()["results"]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(8)))
    assert all([r[0]["id"] for r in res] == ["g0.png", "g1.png", "g2.png", "g3.png"] for res in results)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cli_server_subprocess(assets):
    port = _free_port()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "detreg_keras.serving", "--model", str(assets["onnx"]), "--index",
         str(assets["index_dir"]), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.5)
        assert response.json()["index"]["count"] == 12
        files = [("files", ("q.png", assets["images"][2], "image/png"))]
        hits = httpx.post(f"http://127.0.0.1:{port}/search?k=1", files=files, timeout=20.0).json()["results"]
        assert hits[0][0]["id"] == "g2.png"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --------------------------------------------------------------- hardening (issue 14)
def test_unicode_digit_k_is_422_and_keeps_the_connection(client, assets):
    """k=² passes str.isdigit but not int(): it was a plain-text 500 that reset the keep-alive connection."""
    files = [("file", ("q.png", assets["images"][0], "image/png"))]
    for path, kwargs in (("/search?k=²", {"files": files}), ("/search", {"files": files, "data": {"k": "²"}}),
                         ("/search", {"json": {"images": [base64.b64encode(assets["images"][0]).decode()],
                                               "k": "²"}})):  # fmt: skip
        response = client.post(path, **kwargs)
        assert response.status_code == 422, response.text
        assert "k must be a positive integer" in response.json()["detail"]
    assert client.post("/search?k=1", files=files).status_code == 200  # same pooled connection still usable


def test_pixel_cap_is_derived_from_the_model(assets):
    """Default cap 256 x H x W, at least 1 Mpx (it was 40 Mpx whatever the model); a setting overrides it."""
    from detreg_keras.serving import default_max_pixels

    assert default_max_pixels((28, 28)) == 1_000_000
    assert default_max_pixels((224, 224)) == 256 * 224 * 224
    assert default_max_pixels((4000, 4000)) == 40_000_000
    just_over = _png(np.full((1000, 1001, 3), 128, np.uint8))
    at_cap = _png(np.full((1000, 1000, 3), 128, np.uint8))
    with ServerThread(create_app(assets["embedder"], None)) as running, httpx.Client(
        base_url=running.url, timeout=TIMEOUT
    ) as c:
        assert c.get("/health").json()["limits"]["max_pixels"] == 1_000_000
        response = c.post("/embed", files=[("f", ("big.png", just_over, "image/png"))])
        assert response.status_code == 422 and "1001x1000 exceeds the limit of 1000000" in response.json()["detail"]
        assert c.post("/embed", files=[("f", ("ok.png", at_cap, "image/png"))]).status_code == 200
    with ServerThread(create_app(assets["embedder"], None, max_pixels=2_000_000)) as running:
        response = httpx.post(running.url + "/embed", files=[("f", ("big.png", just_over, "image/png"))], timeout=TIMEOUT)
        assert response.status_code == 200


@pytest.mark.parametrize("kwargs", [{"max_pixels": 0}, {"decode_pixel_budget": 0}, {"max_inflight": -1},
                                    {"max_images": 2.5}, {"default_k": 200}, {"decode_wait_s": 0}])  # fmt: skip
def test_bad_limits_are_refused(assets, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs)) if "default_k" not in kwargs else "exceeds max_k"):
        create_app(assets["embedder"], None, **kwargs)


def test_over_max_inflight_is_503_before_the_body_is_read(assets):
    """A request still sending its body holds the only slot: the next one gets 503 + Retry-After at once."""
    payload = json.dumps({"images": [base64.b64encode(assets["images"][0]).decode()]}).encode()
    with ServerThread(create_app(assets["embedder"], None, max_inflight=1)) as running:
        slow = socket.create_connection((running.host, running.port), timeout=20)
        try:
            head = (f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n").encode()  # fmt: skip
            slow.sendall(head + payload[:10])
            time.sleep(0.3)  # the server has admitted it and waits for the rest of the body
            busy = httpx.post(running.url + "/embed", content=payload, headers={"content-type": "application/json"},
                              timeout=TIMEOUT)  # fmt: skip
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert "busy" in busy.json()["detail"]
            assert httpx.get(running.url + "/health", timeout=TIMEOUT).status_code == 200  # GET never refused
            slow.sendall(payload[10:])
            reply = slow.recv(65536).decode(errors="replace")
            assert reply.startswith("HTTP/1.1 200"), reply[:200]
        finally:
            slow.close()
        ok = httpx.post(running.url + "/embed", content=payload, headers={"content-type": "application/json"},
                        timeout=TIMEOUT)  # fmt: skip
        assert ok.status_code == 200  # the slot was released


class _CountingDecoder:
    """Wraps load_image and records how many pixels are being decoded at once (each call takes 50 ms)."""

    def __init__(self, inner):
        self.inner = inner
        self.active = self.peak = 0
        self.lock = threading.Lock()

    def __call__(self, blob, *args, **kwargs):
        pixels = int(np.prod(Image.open(io.BytesIO(blob)).size))
        with self.lock:
            self.active += pixels
            self.peak = max(self.peak, self.active)
        try:
            time.sleep(0.05)
            return self.inner(blob, *args, **kwargs)
        finally:
            with self.lock:
                self.active -= pixels


@pytest.mark.parametrize("budget_images", [1, 3])
def test_decode_pixel_budget_bounds_the_pixels_decoded_at_once(assets, monkeypatch, budget_images):
    """6 concurrent requests of two 64x64 images: never more than the budget decoded at once (it was unbounded)."""
    from concurrent.futures import ThreadPoolExecutor

    from detreg_runtime import service

    counting = _CountingDecoder(service.load_image)
    monkeypatch.setattr(service, "load_image", counting)
    image = base64.b64encode(_png(np.full((64, 64, 3), 100, np.uint8))).decode()
    app = create_app(assets["embedder"], None, decode_pixel_budget=budget_images * 64 * 64)
    with ServerThread(app) as running, httpx.Client(base_url=running.url, timeout=TIMEOUT) as c:
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda _: c.post("/embed", json={"images": [image] * 2}).status_code, range(6)))
    assert statuses == [200] * 6
    assert counting.peak == budget_images * 64 * 64  # the bound holds, and is reached
    assert app.state.decode_budget.peak == counting.peak and app.state.decode_budget.used == 0


def test_decode_budget_timeout_is_503(assets):
    from detreg_keras.serving import PixelBudget, ServiceBusy

    budget = PixelBudget(100, timeout_s=0.05)
    taken = budget.acquire(10_000)  # larger than the budget: takes all of it
    assert taken == 100 and budget.used == 100
    with pytest.raises(ServiceBusy, match="busy"):
        budget.acquire(1)
    budget.release(taken)
    assert budget.acquire(60) == 60 and budget.used == 60


def test_service_cli_reports_a_damaged_index_in_one_line(assets, tmp_path, capsys):
    """A truncated index.faiss killed start-up with a faiss traceback."""
    import shutil

    from detreg_keras.serving import main

    damaged = tmp_path / "index"
    shutil.copytree(assets["index_dir"], damaged)
    data = (damaged / "index.faiss").read_bytes()
    (damaged / "index.faiss").write_bytes(data[: len(data) * 6 // 10])
    assert main(["--model", str(assets["onnx"]), "--index", str(damaged), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "checksum" in err and "Rebuild" in err
    keras_file = tmp_path / "model.keras"
    keras_file.write_bytes(b"PK\x03\x04 not really")
    assert main(["--model", str(keras_file), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "export_onnx.py" in err


# --------------------------------------------------------------- /match (issue 17)
def _b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def test_match_label_or_unknown_against_brute_force(client, assets):
    """Top-1 label when its cosine >= threshold, else "unknown"; compared with numpy over the gallery."""
    embedder, index = assets["embedder"], assets["index"]
    fresh = _png(np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    queries = [assets["images"][4], fresh]
    sims = embedder.embed(queries) @ embedder.embed(assets["images"]).T
    best = sims.argmax(axis=1)
    gap = float(sims[0, best[0]] - sims[1, best[1]])  # an untrained model: all images are similar
    assert gap > 1e-5
    threshold = float(sims[1, best[1]]) + gap / 2  # the fresh image's best score falls below it
    response = client.post("/match", json={"images": [_b64(q) for q in queries], "threshold": threshold})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["threshold"] == pytest.approx(threshold) and body["model_hash"] == embedder.model_hash
    first, second = body["results"]
    assert first == {"label": "c1", "matched": True, "id": "g4.png", "score": pytest.approx(1.0, abs=1e-5)}
    assert second["label"] == "unknown" and second["matched"] is False
    assert second["id"] == f"g{best[1]}.png" and second["score"] == pytest.approx(sims[1, best[1]], abs=1e-5)
    assert index.labels[best[1]] != "unknown"
    lower = float(sims[1, best[1]]) - gap / 2  # as a query parameter and a form field: now both match
    for kwargs in ({"params": {"threshold": lower}}, {"data": {"threshold": str(lower)}}):
        response = client.post("/match", files=[("file", ("q.png", fresh, "image/png"))], **kwargs)
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["label"] == index.labels[best[1]]


@pytest.mark.parametrize("threshold", [1.5, -1.01, "abc", "nan", True, [0.5]])
def test_match_bad_threshold_is_422(client, assets, threshold):
    response = client.post("/match", json={"images": [_b64(assets["images"][0])], "threshold": threshold})
    assert response.status_code == 422, response.text
    assert "threshold must" in response.json()["detail"]


def test_match_uses_the_index_threshold_and_needs_one(client, assets):
    payload = {"images": [_b64(assets["images"][0])]}
    response = client.post("/match", json=payload)  # the fixture's index has no threshold
    assert response.status_code == 422 and "No match threshold" in response.json()["detail"]
    calibrated = EmbeddingIndex.load(assets["index_dir"], expected_model_hash=assets["embedder"].model_hash)
    calibrated.set_threshold(0.999999)
    with ServerThread(create_app(assets["embedder"], calibrated)) as running, httpx.Client(
        base_url=running.url, timeout=TIMEOUT
    ) as c:
        assert c.get("/health").json()["index"]["threshold"] == 0.999999
        body = c.post("/match", json=payload).json()
        assert body["threshold"] == 0.999999 and body["results"][0]["label"] == "c0"
        unknown = _png(np.random.default_rng(6).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
        assert c.post("/match", json={"images": [_b64(unknown)]}).json()["results"][0]["label"] == "unknown"
    with ServerThread(create_app(assets["embedder"], None)) as running:
        response = httpx.post(running.url + "/match", json=payload, timeout=TIMEOUT)
        assert response.status_code == 503 and "labels" in response.json()["detail"]


def test_embedder_match_checks_the_model(assets):
    embedder, index = assets["embedder"], assets["index"]
    result = embedder.match([assets["images"][4], assets["images"][9]], index, threshold=0.999999)
    assert result.labels == ["c1", "c0"] and list(result.ids) == ["g4.png", "g9.png"]
    other = EmbeddingIndex(model_hash="another-model").build(
        embedder.embed(assets["images"][:3]), labels=["a", "b", "c"]
    )
    with pytest.raises(ValueError, match="another-model"):
        embedder.match(assets["images"][:1], other, threshold=0.5)
