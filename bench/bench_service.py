#!/usr/bin/env python
"""Start-up, load and memory figures of the HTTP retrieval service (``python -m detreg_runtime``), loopback only.

Starts the service in a subprocess on 127.0.0.1 with a small 28x28x1 model
(ONNX) and a 500-image flat index, then measures, in this order:

0. **start-up**: seconds from the process start to the first ``/health`` answer,
   and the service's RSS then;
1. **normal load**: ``--clients`` keep-alive clients POST ``/search?k=5`` with one
   image (JSON base64; ``--query png28``: a 28x28 PNG, ``jpeg64``: a 64x64 JPEG)
   for ``--seconds``: requests/s, p50/p99 latency, errors, service RSS before/after;
2. **decode attack** (issue 14): 6 concurrent requests of two ~240 KB 40-Mpx
   PNGs each, twice: status codes, peak RSS (sampled every 20 ms) and RSS 2 s later;
3. **one 32-image request** of a ~50 KB 40-Mpx grayscale PNG (1.7 MiB): its
   status and the CPU seconds the service spent on it.

    python bench/bench_service.py                       # the working tree
    python bench/bench_service.py --query jpeg64 --load-only
    PYTHONPATH=/path/to/old/checkout python bench/bench_service.py --label old --module detreg_keras.serving

Bounded: every request has a timeout, the service is killed at the end.
Prints one JSON object (also written to ``--output`` when given).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _png(array: np.ndarray, **kwargs) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG", **kwargs)
    return buf.getvalue()


def bomb_png(megapixels: float = 40.0, seed: int = 0, noise_rows: int = 8, channels: int = 3) -> bytes:
    """A small PNG of ``megapixels``: flat but for ``noise_rows`` random rows (8 RGB rows: ~280 KB)."""
    side = int(np.sqrt(megapixels * 1e6))
    image = np.zeros((side, side, channels) if channels > 1 else (side, side), np.uint8)
    rng = np.random.default_rng(seed)
    rows = np.arange(0, side, max(1, side // max(1, noise_rows)))[:noise_rows]
    image[rows] = rng.integers(0, 256, image[rows].shape, dtype=np.uint8)
    return _png(image, compress_level=9)


def build_assets(folder: Path) -> tuple[Path, Path]:
    """A 28x28x1 DRegModel exported to ONNX and a 500-image index (this process's detreg_keras)."""
    import keras

    import detreg_keras
    from detreg_keras import export
    from detreg_keras.retrieval import Embedder, EmbeddingIndex

    keras.utils.set_random_seed(0)
    model = detreg_keras.DRegModel(num_classes=5, backbone="small_cnn", image_size=28, channels=1,
                                   embedding_dim=64, hidden_units=64, num_couplings=4)  # fmt: skip
    model(np.zeros((1, 28, 28, 1), np.float32))
    onnx_path = folder / "model.onnx"
    export.export_onnx(model, onnx_path)
    embedder = Embedder(onnx_path)
    gallery = np.random.default_rng(1).integers(0, 256, (500, 28, 28, 1), dtype=np.uint8)
    index = EmbeddingIndex(model_hash=embedder.model_hash).build(embedder.embed(gallery), ids=np.arange(500))
    return onnx_path, index.save(folder / "index")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def _post(conn: http.client.HTTPConnection, path: str, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def query_image(kind: str) -> bytes:
    """``"png28"``: a 28x28 gray PNG (the model's size); ``"jpeg64"``: a 64x64 RGB JPEG (decoded, resized)."""
    rng = np.random.default_rng(7)
    if kind == "png28":
        return _png(rng.integers(0, 256, (28, 28), dtype=np.uint8))
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def normal_load(port: int, pid: int, clients: int, seconds: float, query: bytes) -> dict:
    body = json.dumps({"images": [base64.b64encode(query).decode()]}).encode()
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine, bad = [], 0
        while time.monotonic() < stop:
            start = time.perf_counter()
            try:
                status, _ = _post(conn, "/search?k=5", body)
            except (OSError, http.client.HTTPException):
                status = -1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            mine.append(time.perf_counter() - start)
            bad += status != 200
        conn.close()
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    rss_before = _rss(pid)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begin
    lat = sorted(latencies)
    return {
        "clients": clients,
        "query_bytes": len(query),
        "requests": len(lat),
        "errors": errors[0],
        "req_per_s": round(len(lat) / elapsed, 1),
        "p50_ms": round(1e3 * statistics.median(lat), 2),
        "p99_ms": round(1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_after_mb": round(_rss(pid) / 2**20, 1),
    }


def attack(port: int, pid: int, bombs: list[bytes], concurrent: int = 6, rounds: int = 2) -> dict:
    body = json.dumps({"images": [base64.b64encode(b).decode() for b in bombs[:2]]}).encode()
    statuses: list[int] = []
    peak = [_rss(pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss(pid))
            time.sleep(0.02)

    def one() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            statuses.append(_post(conn, "/embed", body)[0])
        except (OSError, http.client.HTTPException):
            statuses.append(-1)
        finally:
            conn.close()

    before = _rss(pid)
    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    for _ in range(rounds):
        threads = [threading.Thread(target=one) for _ in range(concurrent)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    seconds = time.perf_counter() - start
    time.sleep(2.0)
    done.set()
    sampler.join()
    return {
        "request_kb": round(len(body) / 1024, 1),
        "png_kb": [round(len(b) / 1024, 1) for b in bombs[:2]],
        "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        "seconds": round(seconds, 2),
        "rss_before_mb": round(before / 2**20, 1),
        "rss_peak_mb": round(peak[0] / 2**20, 1),
        "rss_after_2s_mb": round(_rss(pid) / 2**20, 1),
    }


def big_request(port: int, pid: int, bomb: bytes, images: int = 32) -> dict:
    import psutil

    body = json.dumps({"images": [base64.b64encode(bomb).decode()] * images}).encode()
    proc = psutil.Process(pid)
    cpu = sum(proc.cpu_times()[:2])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    status, reply = _post(conn, "/embed", body)
    conn.close()
    return {
        "images": images,
        "request_mib": round(len(body) / 2**20, 2),
        "status": status,
        "detail": json.loads(reply).get("detail", "")[:120] if status != 200 else "",
        "wall_s": round(time.perf_counter() - start, 2),
        "service_cpu_s": round(sum(proc.cpu_times()[:2]) - cpu, 2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=3.5)
    p.add_argument("--label", default="working tree")
    p.add_argument("--output", default=None)
    p.add_argument("--serve-args", default="", help="extra arguments for the service CLI")
    p.add_argument("--load-only", action="store_true", help="only the normal-load phase")
    p.add_argument("--query", choices=("png28", "jpeg64"), default="png28", help="the normal-load query image")
    p.add_argument("--module", default="detreg_runtime",
                   help="module started with python -m (detreg_keras.serving before the runtime existed)")
    args = p.parse_args(argv)

    import detreg_keras

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, index_dir = build_assets(Path(tmp))
        port = _free_port()
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        cmd = [sys.executable, "-m", args.module, "--model", str(onnx_path), "--index", str(index_dir),
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *args.serve_args.split()]
        started = time.perf_counter()
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None:
                    raise RuntimeError(server.stderr.read().decode()[-2000:])
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    conn.request("GET", "/health")
                    conn.getresponse().read()
                    conn.close()
                    startup_s = time.perf_counter() - started
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the service did not start within 120 s") from None
                    time.sleep(0.05)
            startup = {"seconds": round(startup_s, 2), "rss_mb": round(_rss(server.pid) / 2**20, 1)}
            bombs = [bomb_png(seed=i) for i in range(2)]
            query = query_image(args.query)
            normal_load(port, server.pid, 2, 0.5, query)  # warm-up
            report = {
                "label": args.label,
                "detreg_keras": str(Path(detreg_keras.__file__).parent),
                "cpus": os.cpu_count(),
                "load_average_1min_at_start": round(os.getloadavg()[0], 2),
                "module": args.module,
                "startup": startup,
                "query": args.query,
                "normal_load": normal_load(port, server.pid, args.clients, args.seconds, query),
            }
            if not args.load_only:
                report["attack"] = attack(port, server.pid, bombs)
                report["big_request"] = big_request(port, server.pid, bomb_png(noise_rows=1, channels=1))
                report["normal_load_after"] = normal_load(port, server.pid, args.clients, args.seconds, query)
        finally:
            server.kill()
            server.wait(timeout=30)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
