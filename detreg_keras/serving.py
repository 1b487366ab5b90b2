"""A small HTTP retrieval service (FastAPI + uvicorn) over an ONNX embedder and a faiss index.

Endpoints:

* ``GET /health``: model hash, image size, embedding dimension, index summary.
* ``POST /embed``: images → ``{"embeddings": [[...]], "dimension", "model_hash", "count"}``.
* ``POST /search?k=5``: images → ``{"k", "results": [[{"rank", "id", "label", "score"}, ...]]}``
  (``503`` when the service runs without an index).
* ``POST /match?threshold=0.6``: images → ``{"threshold", "results": [{"label", "matched", "id", "score"}]}``:
  the top-1 neighbour's label when its cosine is ``>= threshold``, else ``"unknown"``; the
  threshold defaults to the one stored in the index (``EmbeddingIndex.calibrate``); ``422``
  for a threshold outside ``[-1, 1]`` or none at all, ``503`` without an index with labels.

Images are sent either as ``multipart/form-data`` file parts (any field name,
e.g. ``curl -F files=@a.jpg -F files=@b.png``) or as JSON
``{"images": ["<base64>", ...], "k": 5}`` (items may also be ``{"b64": "..."}``
as in TF Serving's REST API, or ``data:image/...;base64,`` URLs). Bodies larger
than ``max_request_bytes`` (default 10 MiB) get ``413``; malformed JSON or
base64 ``400``; an unsupported content type ``415``; undecodable or too large
images, too many images or a bad ``k`` ``422``; a full service ``503`` (with
``Retry-After``) — always with a ``{"detail": "..."}`` message.

Memory and CPU are bounded: an image's size is read from its header and
refused above ``max_pixels`` (default from the model's input size, see
:func:`default_max_pixels`) before any pixel is decoded; the images being
decoded at any moment hold at most ``decode_pixel_budget`` pixels in all
(default ``2 x max_pixels``: any number of small images, two of the largest
size; the others wait for their turn, ``503`` after ``decode_wait_s``); and at
most ``max_inflight`` embedding requests are admitted (read, queued or working)
— beyond that the service answers ``503`` without reading the body.

Run it::

    python -m detreg_keras.serving --model model.onnx --index index_dir --host 127.0.0.1 --port 8000

Needs the ``serve`` extra: ``pip install 'detreg-keras[serve]'`` (fastapi, uvicorn,
python-multipart; httpx for the tests).
"""

import argparse
import base64
import binascii
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from detreg_keras.retrieval import Embedder, EmbeddingIndex, image_header_size, load_image

DEFAULT_MAX_REQUEST_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_IMAGES = 64
DEFAULT_MAX_K = 100
#: Largest per-image cap :func:`default_max_pixels` derives (decompression bombs).
MAX_PIXELS_CEILING = 40_000_000
#: Smallest per-image cap :func:`default_max_pixels` derives (1000 x 1000).
MIN_DEFAULT_PIXELS = 1_000_000
#: Default cap: 16 times the model's input side in each direction.
PIXELS_PER_MODEL_PIXEL = 256
DEFAULT_MAX_INFLIGHT = 32
_ASCII_INT = re.compile(r"[0-9]+")


def default_max_pixels(image_size: tuple[int, int]) -> int:
    """Per-image pixel cap derived from the model's input ``(H, W)``.

    ``256 x H x W`` (an image 16 times the model's side in each direction, which
    the resize brings down to the model's size anyway), at least
    :data:`MIN_DEFAULT_PIXELS` and at most :data:`MAX_PIXELS_CEILING`: 1 Mpx for
    a 28x28 model, 12.8 Mpx for 224x224 (a 12 Mpx photo passes).
    """
    height, width = (int(v) for v in image_size)
    return int(min(MAX_PIXELS_CEILING, max(MIN_DEFAULT_PIXELS, PIXELS_PER_MODEL_PIXEL * height * width)))


class ServiceBusy(Exception):
    """The decode budget stayed full for ``decode_wait_s`` (answered ``503``)."""


class PixelBudget:
    """A counting semaphore over decoded pixels, shared by the worker threads.

    ``hold(n)`` waits until ``n`` more pixels fit under ``capacity`` (an image
    larger than the whole budget waits until it is alone), so the memory of the
    images being decoded at once is bounded whatever the number of requests.
    """

    def __init__(self, capacity: int, timeout_s: float):
        self.capacity = int(capacity)
        self.timeout_s = float(timeout_s)
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    def acquire(self, pixels: int) -> int:
        """Take ``min(pixels, capacity)``; returns the amount to :meth:`release`.

        Raises:
            ServiceBusy: the budget did not free up within ``timeout_s``.
        """
        need = min(int(pixels), self.capacity)
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + need <= self.capacity, timeout=self.timeout_s):
                raise ServiceBusy(
                    f"The service is busy decoding other images (budget {self.capacity} pixels); retry shortly."
                )
            self.used += need
            self.peak = max(self.peak, self.used)
        return need

    def release(self, taken: int) -> None:
        with self._cond:
            self.used -= taken
            self._cond.notify_all()


def _require_fastapi():
    try:
        import fastapi  # noqa: F401, PLC0415
        import uvicorn  # noqa: F401, PLC0415

        try:  # python-multipart, used by request.form()
            import python_multipart  # noqa: F401, PLC0415
        except ImportError:
            import multipart  # noqa: F401, PLC0415
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The HTTP service needs FastAPI, uvicorn and python-multipart: "
            "pip install 'detreg-keras[serve]' (or pip install fastapi uvicorn python-multipart)."
        ) from err


class BodySizeLimitMiddleware:
    """ASGI middleware answering ``413`` to bodies over ``max_bytes``.

    Checks ``Content-Length`` before reading anything and counts the bytes of
    chunked bodies as they arrive.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    async def _reply(self, send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"Request body exceeds the limit of {self.max_bytes} bytes."
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await self._reply(send, 400, "Invalid Content-Length header.")
                    return
                if length > self.max_bytes:
                    await self._reply(send, 413, too_large)
                    return
        received = 0
        started = False

        class _TooLarge(Exception):
            pass

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reply(send, 413, too_large)


class AdmissionMiddleware:
    """ASGI middleware admitting at most ``max_inflight`` ``POST`` requests at once; ``503`` beyond.

    A refused request is answered before its body is read, so a flood of large
    requests cannot pile up bodies in memory; ``GET`` (``/health``) is never refused.
    """

    def __init__(self, app, max_inflight: int):
        self.app = app
        self.max_inflight = int(max_inflight)
        self.inflight = 0  # only touched from the event loop

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.max_inflight:
            body = json.dumps(
                {"detail": f"The service is busy ({self.inflight} requests in progress); retry in a second."}
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"retry-after", b"1"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1


def parse_k(value: Any, max_k: int) -> int:
    """A ``k`` from a query parameter, form field or JSON value: a plain integer in ``[1, max_k]``.

    Only ASCII digits are accepted in strings (``"²"`` passes ``str.isdigit`` but not ``int``).

    Raises:
        ValueError: anything else, with the message the service answers (422).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        k = value
    elif isinstance(value, str) and _ASCII_INT.fullmatch(value.strip()):
        k = int(value.strip())
    else:
        raise ValueError(f"k must be a positive integer, got {value!r}.")
    if not 1 <= k <= max_k:
        raise ValueError(f"k must lie in [1, {max_k}], got {k}.")
    return k


def parse_threshold(value: Any) -> float:
    """A match threshold from a query parameter, form field or JSON value: a number in ``[-1, 1]``.

    Raises:
        ValueError: anything else, with the message the service answers (422).
    """
    from detreg_keras.verification import check_threshold  # noqa: PLC0415

    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            message = f"The threshold must be a number in [-1, 1] (a cosine similarity), got {value!r}."
            raise ValueError(message) from None
    return check_threshold(value)


def _decode_b64(item: Any, position: int) -> bytes:
    if isinstance(item, dict):
        if set(item) != {"b64"}:
            raise ValueError(f"images[{position}]: objects must be {{\"b64\": \"...\"}}, got keys {sorted(item)}.")
        item = item["b64"]
    if not isinstance(item, str):
        raise ValueError(f"images[{position}] must be a base64 string, got {type(item).__name__}.")  # noqa: TRY004
    if item.startswith("data:"):
        header, _, item = item.partition(",")
        if not header.endswith(";base64"):
            raise ValueError(f"images[{position}]: data URLs must be base64 encoded.")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"images[{position}] is not valid base64: {err}.") from err


def create_app(
    embedder: Embedder | str | os.PathLike,
    index: EmbeddingIndex | str | os.PathLike | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_k: int = DEFAULT_MAX_K,
    default_k: int = 5,
    max_pixels: int | None = None,
    decode_pixel_budget: int | None = None,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
    decode_wait_s: float = 30.0,
):
    """Build the FastAPI application.

    Args:
        embedder: an :class:`~detreg_keras.retrieval.Embedder` or an ONNX path.
        index: an :class:`~detreg_keras.retrieval.EmbeddingIndex`, an index folder
            (loaded with the embedder's model hash: an index of another model is
            refused) or ``None`` (``/search`` answers 503).
        max_request_bytes: body size limit (413 above).
        max_images: images per request (422 above).
        max_k: largest ``k`` accepted by ``/search``.
        default_k: ``k`` when the request gives none.
        max_pixels: largest image (width × height, read from its header) accepted;
            ``None``: :func:`default_max_pixels` of the model's input size.
        decode_pixel_budget: pixels of all the images being decoded at once
            (see :class:`PixelBudget`); ``None``: ``2 * max_pixels``.
        max_inflight: ``POST`` requests admitted at once (reading, waiting or
            working); more get ``503`` with ``Retry-After: 1``.
        decode_wait_s: longest wait for the decode budget before ``503``.

    Raises:
        ValueError: a limit is not a positive integer, or the index belongs to another model.
    """
    _require_fastapi()
    from fastapi import FastAPI, HTTPException, Request  # noqa: PLC0415
    from starlette.concurrency import run_in_threadpool  # noqa: PLC0415

    from detreg_keras.export import detreg_version  # noqa: PLC0415

    if not isinstance(embedder, Embedder):
        embedder = Embedder(embedder)
    max_pixels = default_max_pixels(embedder.image_size) if max_pixels is None else max_pixels
    if isinstance(max_pixels, int) and decode_pixel_budget is None:
        decode_pixel_budget = 2 * max_pixels
    limits = {"max_request_bytes": max_request_bytes, "max_images": max_images, "max_k": max_k,
              "default_k": default_k, "max_pixels": max_pixels, "decode_pixel_budget": decode_pixel_budget,
              "max_inflight": max_inflight}  # fmt: skip
    for name, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not decode_wait_s > 0:
        raise ValueError(f"decode_wait_s must be positive, got {decode_wait_s!r}.")
    if default_k > max_k:
        raise ValueError(f"default_k={default_k} exceeds max_k={max_k}.")
    if index is not None and not isinstance(index, EmbeddingIndex):
        index = EmbeddingIndex.load(
            index, expected_model_hash=embedder.model_hash, expected_dimension=embedder.embedding_dim
        )
    if index is not None and index.model_hash != embedder.model_hash:
        raise ValueError(
            f"The index was built with model {index.model_hash!r}, the embedder is model {embedder.model_hash!r}."
        )

    app = FastAPI(
        title="detreg-keras retrieval",
        version=detreg_version(),
        description="Embeds images with the exported DReg model (onnxruntime) and searches a faiss index.",
    )
    app.state.embedder = embedder
    app.state.index = index
    app.state.limits = limits
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_bytes)
    app.add_middleware(AdmissionMiddleware, max_inflight=max_inflight)  # outermost: refuses before any read
    budget = PixelBudget(decode_pixel_budget, decode_wait_s)
    app.state.decode_budget = budget

    async def read_images(request: Request) -> tuple[list[bytes], dict[str, Any]]:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        fields: dict[str, Any] = {}
        blobs: list[bytes] = []
        if content_type == "multipart/form-data":
            try:
                form = await request.form(max_files=max_images + 1, max_fields=64)
            except HTTPException:
                raise
            except Exception as err:
                raise HTTPException(400, f"Malformed multipart body: {err}") from err
            try:
                for key, value in form.multi_items():
                    if hasattr(value, "read"):
                        blobs.append(await value.read())
                    else:
                        fields[key] = value
            finally:
                await form.close()
        elif content_type in ("application/json", ""):
            raw = await request.body()
            try:
                payload = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise HTTPException(400, f"Malformed JSON body: {err}") from err
            if not isinstance(payload, dict):
                raise HTTPException(422, 'The JSON body must be an object like {"images": ["<base64>", ...]}.')
            items = payload.get("images", payload.get("instances"))
            if items is None and "image" in payload:
                items = [payload["image"]]
            if items is None:
                raise HTTPException(422, 'The JSON body needs "images": a list of base64-encoded images.')
            if not isinstance(items, list):
                raise HTTPException(422, '"images" must be a list of base64-encoded images.')
            if len(items) > max_images:
                raise HTTPException(422, f"At most {max_images} images per request, got {len(items)}.")
            try:
                blobs = [_decode_b64(item, i) for i, item in enumerate(items)]
            except ValueError as err:
                raise HTTPException(400, str(err)) from err
            fields = {k: v for k, v in payload.items() if k not in ("images", "instances", "image")}
        else:
            raise HTTPException(
                415, f"Unsupported content type {content_type!r}: send multipart/form-data files or JSON base64 images."
            )
        if not blobs:
            raise HTTPException(422, "No image in the request.")
        if len(blobs) > max_images:
            raise HTTPException(422, f"At most {max_images} images per request, got {len(blobs)}.")
        return blobs, fields

    def decode_one(blob: bytes, position: int) -> np.ndarray:
        if not blob:
            raise ValueError(f"Image {position} is empty.")
        try:
            width, height = image_header_size(blob)
            if width * height > max_pixels:
                raise ValueError(f"{width}x{height} exceeds the limit of {max_pixels} pixels (--max-pixels).")
            taken = budget.acquire(width * height)
            try:
                return load_image(blob, embedder.image_size, embedder.channels, max_pixels=max_pixels)
            finally:
                budget.release(taken)
        except ValueError as err:
            raise ValueError(f"Image {position}: {err}") from err

    def embed_blobs(blobs: list[bytes]) -> np.ndarray:
        return embedder.embed(np.stack([decode_one(blob, i) for i, blob in enumerate(blobs)]))

    async def embed_blobs_bounded(blobs: list[bytes]) -> np.ndarray:
        try:
            return await run_in_threadpool(embed_blobs, blobs)
        except ValueError as err:
            raise HTTPException(422, str(err)) from err
        except ServiceBusy as err:
            raise HTTPException(503, str(err), headers={"Retry-After": "1"}) from err

    @app.get("/health")
    def health() -> dict[str, Any]:
        idx = app.state.index
        return {
            "status": "ok",
            "model_hash": embedder.model_hash,
            "embedding_dim": embedder.embedding_dim,
            "image_size": list(embedder.image_size),
            "channels": embedder.channels,
            "providers": embedder.providers,
            "detreg_version": detreg_version(),
            "index": None
            if idx is None
            else {"kind": idx.kind, "count": idx.count, "params": idx.params, "threshold": idx.threshold},
            "limits": limits,
        }

    @app.post("/embed")
    async def embed(request: Request) -> dict[str, Any]:
        blobs, _ = await read_images(request)
        embeddings = await embed_blobs_bounded(blobs)
        return {
            "embeddings": embeddings.tolist(),
            "dimension": int(embeddings.shape[1]),
            "count": int(embeddings.shape[0]),
            "model_hash": embedder.model_hash,
        }

    @app.post("/search")
    async def search(request: Request) -> dict[str, Any]:
        idx = app.state.index
        if idx is None:
            raise HTTPException(503, "This service was started without an index (--index); only /embed works.")
        k_raw = request.query_params.get("k")
        blobs, fields = await read_images(request)
        k_raw = fields.get("k", k_raw)
        try:  # checked before the images are decoded
            k = default_k if k_raw is None else parse_k(k_raw, max_k)
        except ValueError as err:
            raise HTTPException(422, str(err)) from err
        embeddings = await embed_blobs_bounded(blobs)
        ids, labels, scores = await run_in_threadpool(idx.search, embeddings, k)
        results = []
        for q in range(len(ids)):
            row = []
            for r in range(ids.shape[1]):
                if not np.isfinite(scores[q, r]):
                    continue
                row.append(
                    {
                        "rank": r + 1,
                        "id": ids[q, r].item(),
                        "label": None if labels is None else labels[q, r].item(),
                        "score": float(scores[q, r]),
                    }
                )
            results.append(row)
        return {"k": min(k, idx.count), "results": results, "model_hash": embedder.model_hash}

    @app.post("/match")
    async def match(request: Request) -> dict[str, Any]:
        idx = app.state.index
        if idx is None or idx.labels is None:
            raise HTTPException(503, "/match needs an index with labels (--index); this service has none.")
        raw = request.query_params.get("threshold")
        blobs, fields = await read_images(request)
        raw = fields.get("threshold", raw)
        if raw is None and idx.threshold is None:
            raise HTTPException(
                422, "No match threshold: pass threshold (in [-1, 1]), or calibrate the index "
                "(EmbeddingIndex.calibrate) so that it stores one."
            )
        try:  # checked before the images are decoded
            threshold = idx.threshold if raw is None else parse_threshold(raw)
        except ValueError as err:
            raise HTTPException(422, str(err)) from err
        embeddings = await embed_blobs_bounded(blobs)
        found = await run_in_threadpool(idx.match, embeddings, threshold)
        results = [
            {
                "label": label,
                "matched": bool(matched),
                "id": None if not np.isfinite(score) else found_id.item(),
                "score": float(score) if np.isfinite(score) else None,
            }
            for label, matched, found_id, score in zip(found.labels, found.matched, found.ids, found.scores)
        ]
        return {"threshold": found.threshold, "results": results, "model_hash": embedder.model_hash}

    return app


class ServerThread:
    """Run a uvicorn server for ``app`` in a background thread (tests, notebooks).

    Binds ``host:port`` (port 0 picks a free port) before starting, so
    :attr:`url` is known at once; ``with ServerThread(app) as server: ...``
    starts it and waits until it accepts connections, and stops it on exit.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn  # noqa: PLC0415

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = self.socket.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        config = uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_keep_alive=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url} within {timeout} s.")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.socket.close()

    def __enter__(self) -> "ServerThread":  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def limit_tensorflow_threads(threads: int) -> bool:
    """Give TensorFlow ``threads`` inter- and intra-op threads, if its runtime has not started yet.

    In the service TensorFlow only decodes images (onnxruntime embeds them), one
    small image per call from many worker threads at once; with one thread per
    pool a JPEG decode + resize took 0.23 instead of 0.44 ms here.

    Returns:
        Whether the setting took effect (``False`` once TensorFlow's runtime is initialised).
    """
    import tensorflow as tf  # noqa: PLC0415

    try:
        tf.config.threading.set_inter_op_parallelism_threads(int(threads))
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
    except RuntimeError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m detreg_keras.serving", description="Serve /embed, /search and /match over HTTP."
    )
    parser.add_argument("--model", required=True, help="ONNX model from scripts/export_onnx.py")
    parser.add_argument("--index", default=None, help="index folder from scripts/detreg_index.py build")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_BYTES / 2**20)
    parser.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES)
    parser.add_argument("--max-k", type=int, default=DEFAULT_MAX_K)
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="largest image (width x height) accepted; default 256 x the model's H x W, "
                             f"at least {MIN_DEFAULT_PIXELS:,}, at most {MAX_PIXELS_CEILING:,}")
    parser.add_argument("--decode-pixel-budget", type=int, default=None,
                        help="pixels of all images being decoded at once (default: 2 x --max-pixels)")
    parser.add_argument("--max-inflight", type=int, default=DEFAULT_MAX_INFLIGHT,
                        help="requests admitted at once; more get 503 + Retry-After")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--tf-threads", type=int, default=1,
                        help="TensorFlow inter-/intra-op threads for image decoding (default 1; 0: TF's default)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.tf_threads < 0:
        parser.error("--tf-threads must be >= 0")
    if args.tf_threads:
        limit_tensorflow_threads(args.tf_threads)
    try:
        _require_fastapi()
        import uvicorn  # noqa: PLC0415

        embedder = Embedder(args.model, intra_op_num_threads=args.threads)
        app = create_app(
            embedder,
            args.index,
            max_request_bytes=int(args.max_request_mb * 2**20),
            max_images=args.max_images,
            max_k=args.max_k,
            max_pixels=args.max_pixels,
            decode_pixel_budget=args.decode_pixel_budget,
            max_inflight=args.max_inflight,
        )
    except (ImportError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = [
    "AdmissionMiddleware",
    "BodySizeLimitMiddleware",
    "ServerThread",
    "create_app",
    "PixelBudget",
    "ServiceBusy",
    "default_max_pixels",
    "limit_tensorflow_threads",
    "main",
    "parse_k",
    "parse_threshold",
]
