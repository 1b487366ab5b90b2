"""The HTTP retrieval service (FastAPI + uvicorn) over an ONNX embedder and a faiss index; no TensorFlow.

Endpoints:

* ``GET /health``: model hash, image size, embedding dimension, index summary, limits.
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

Images are decoded by :mod:`detreg_runtime.imaging` (numpy/PIL/simplejpeg, the
same pixels as training and the SavedModel). Memory and CPU are bounded
(:class:`ServiceLimits`): at most ``max_images`` images per request (default:
the embedder's ``batch_size``, 64, so a request is one onnxruntime run); an
image's size is read from its header and refused above ``max_pixels`` (default
from the model's input size, see :func:`default_max_pixels`) before any pixel
is decoded; the images being decoded at any moment hold at most
``decode_pixel_budget`` pixels in all (default ``2 x max_pixels``; the others
wait for their turn, ``503`` after ``decode_wait_s``); and at most
``max_inflight`` embedding requests are admitted (read, queued or working) —
beyond that the service answers ``503`` without reading the body.

Run it (the ``serve`` extra: ``pip install 'detreg-keras[serve]'``)::

    detreg-serve --model model.onnx --index index_dir --host 127.0.0.1 --port 8000
    python -m detreg_runtime --model model.onnx --index index_dir      # the same
"""

import argparse
import base64
import binascii
import dataclasses
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

from detreg_runtime._version import detreg_version
from detreg_runtime.embedder import Embedder
from detreg_runtime.imaging import image_header_size, load_image
from detreg_runtime.index import EmbeddingIndex
from detreg_runtime.verification import check_threshold

DEFAULT_MAX_REQUEST_BYTES = 10 * 1024 * 1024
#: Images per request when the embedder is not there to say (its ``batch_size`` is the default).
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


@dataclasses.dataclass(frozen=True)
class ServiceLimits:
    """The service's limits; ``None`` fields are derived from the model by :meth:`resolve`.

    Attributes:
        max_request_bytes: body size limit (413 above).
        max_images: images per request (422 above); ``None``: the embedder's
            ``batch_size`` (64 by default), so a request is one onnxruntime run.
        max_k: largest ``k`` accepted by ``/search``.
        default_k: ``k`` when the request gives none.
        max_pixels: largest image (width x height, read from its header);
            ``None``: :func:`default_max_pixels` of the model's input size.
        decode_pixel_budget: pixels of all the images being decoded at once
            (see :class:`PixelBudget`); ``None``: ``2 * max_pixels``.
        max_inflight: ``POST`` requests admitted at once (reading, waiting or
            working); more get ``503`` with ``Retry-After: 1``.
        decode_wait_s: longest wait for the decode budget before ``503``.
    """

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_images: int | None = None
    max_k: int = DEFAULT_MAX_K
    default_k: int = 5
    max_pixels: int | None = None
    decode_pixel_budget: int | None = None
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    decode_wait_s: float = 30.0

    def resolve(self, embedder: Embedder) -> "ServiceLimits":
        """The limits with every ``None`` filled in from ``embedder``, checked.

        Raises:
            ValueError: a limit is not a positive integer, ``decode_wait_s`` is
                not positive, or ``default_k > max_k``.
        """
        max_images = embedder.batch_size if self.max_images is None else self.max_images
        max_pixels = default_max_pixels(embedder.image_size) if self.max_pixels is None else self.max_pixels
        budget = self.decode_pixel_budget
        if budget is None and isinstance(max_pixels, int):
            budget = 2 * max_pixels
        out = dataclasses.replace(self, max_images=max_images, max_pixels=max_pixels, decode_pixel_budget=budget)
        for name, value in out.as_dict().items():
            if name != "decode_wait_s" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not out.decode_wait_s > 0:
            raise ValueError(f"decode_wait_s must be positive, got {out.decode_wait_s!r}.")
        if out.default_k > out.max_k:
            raise ValueError(f"default_k={out.default_k} exceeds max_k={out.max_k}.")
        return out

    def as_dict(self) -> dict[str, Any]:
        """The limits as a JSON-ready dict (``/health``)."""
        return dataclasses.asdict(self)


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
        raise ValueError(f"images[{position}] must be a base64 string, got {type(item).__name__}.")
    if item.startswith("data:"):
        header, _, item = item.partition(",")
        if not header.endswith(";base64"):
            raise ValueError(f"images[{position}]: data URLs must be base64 encoded.")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"images[{position}] is not valid base64: {err}.") from err


class ImageDecoder:
    """Decodes request images under the pixel cap and the shared :class:`PixelBudget`, and embeds them."""

    def __init__(self, embedder: Embedder, limits: ServiceLimits):
        self.embedder = embedder
        self.max_pixels = int(limits.max_pixels)
        self.budget = PixelBudget(limits.decode_pixel_budget, limits.decode_wait_s)

    def decode(self, blob: bytes, position: int) -> np.ndarray:
        """One image as the model's float32 ``[H, W, C]``.

        Raises:
            ValueError: empty, undecodable or larger than ``max_pixels`` (``"Image <position>: ..."``).
            ServiceBusy: the decode budget stayed full.
        """
        if not blob:
            raise ValueError(f"Image {position} is empty.")
        try:
            width, height = image_header_size(blob)
            if width * height > self.max_pixels:
                raise ValueError(f"{width}x{height} exceeds the limit of {self.max_pixels} pixels (--max-pixels).")
            taken = self.budget.acquire(width * height)
            try:
                return load_image(blob, self.embedder.image_size, self.embedder.channels)  # size checked above
            finally:
                self.budget.release(taken)
        except ValueError as err:
            raise ValueError(f"Image {position}: {err}") from err

    def embed(self, blobs: list[bytes]) -> np.ndarray:
        """Embeddings ``[len(blobs), D]`` of encoded images."""
        return self.embedder.embed(np.stack([self.decode(blob, i) for i, blob in enumerate(blobs)]))


def _http_error(status: int, detail: str, headers: dict[str, str] | None = None):
    from fastapi import HTTPException  # noqa: PLC0415

    return HTTPException(status, detail, headers=headers)


async def _read_multipart(request, max_images: int) -> tuple[list[bytes], dict[str, Any]]:
    from fastapi import HTTPException  # noqa: PLC0415

    try:
        form = await request.form(max_files=max_images + 1, max_fields=64)
    except HTTPException:
        raise
    except Exception as err:
        raise _http_error(400, f"Malformed multipart body: {err}") from err
    blobs: list[bytes] = []
    fields: dict[str, Any] = {}
    try:
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                blobs.append(await value.read())
            else:
                fields[key] = value
    finally:
        await form.close()
    return blobs, fields


def _json_items(payload: Any, max_images: int) -> list:
    """The image items of a JSON body (``images``, ``instances`` or one ``image``), checked."""
    if not isinstance(payload, dict):
        raise _http_error(422, 'The JSON body must be an object like {"images": ["<base64>", ...]}.')
    items = payload.get("images", payload.get("instances"))
    if items is None and "image" in payload:
        items = [payload["image"]]
    if items is None:
        raise _http_error(422, 'The JSON body needs "images": a list of base64-encoded images.')
    if not isinstance(items, list):
        raise _http_error(422, '"images" must be a list of base64-encoded images.')
    if len(items) > max_images:
        raise _http_error(422, f"At most {max_images} images per request, got {len(items)}.")
    return items


async def _read_json(request, max_images: int) -> tuple[list[bytes], dict[str, Any]]:
    try:
        payload = json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _http_error(400, f"Malformed JSON body: {err}") from err
    items = _json_items(payload, max_images)
    try:
        blobs = [_decode_b64(item, i) for i, item in enumerate(items)]
    except ValueError as err:
        raise _http_error(400, str(err)) from err
    return blobs, {k: v for k, v in payload.items() if k not in ("images", "instances", "image")}


async def read_images(request, max_images: int) -> tuple[list[bytes], dict[str, Any]]:
    """The encoded images and the other fields of a multipart or JSON request.

    Raises:
        HTTPException: 400 malformed body, 415 other content types, 422 no image or too many.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        blobs, fields = await _read_multipart(request, max_images)
    elif content_type in ("application/json", ""):
        blobs, fields = await _read_json(request, max_images)
    else:
        raise _http_error(
            415, f"Unsupported content type {content_type!r}: send multipart/form-data files or JSON base64 images."
        )
    if not blobs:
        raise _http_error(422, "No image in the request.")
    if len(blobs) > max_images:
        raise _http_error(422, f"At most {max_images} images per request, got {len(blobs)}.")
    return blobs, fields


def search_results(ids: np.ndarray, labels: np.ndarray | None, scores: np.ndarray) -> list[list[dict[str, Any]]]:
    """``/search`` rows: ``{"rank", "id", "label", "score"}`` per filled slot, best first."""
    return [
        [
            {
                "rank": r + 1,
                "id": ids[q, r].item(),
                "label": None if labels is None else labels[q, r].item(),
                "score": float(scores[q, r]),
            }
            for r in range(ids.shape[1])
            if np.isfinite(scores[q, r])
        ]
        for q in range(len(ids))
    ]


def match_results(found) -> list[dict[str, Any]]:
    """``/match`` rows: ``{"label", "matched", "id", "score"}`` per query (``None`` id/score when nothing was found)."""
    return [
        {
            "label": label,
            "matched": bool(matched),
            "id": None if not np.isfinite(score) else found_id.item(),
            "score": float(score) if np.isfinite(score) else None,
        }
        for label, matched, found_id, score in zip(found.labels, found.matched, found.ids, found.scores)
    ]


def _load_index(index, embedder: Embedder) -> EmbeddingIndex | None:
    """An index object or folder checked to belong to ``embedder``'s model (``None`` stays ``None``)."""
    if index is not None and not isinstance(index, EmbeddingIndex):
        index = EmbeddingIndex.load(
            index, expected_model_hash=embedder.model_hash, expected_dimension=embedder.embedding_dim
        )
    if index is not None and index.model_hash != embedder.model_hash:
        raise ValueError(
            f"The index was built with model {index.model_hash!r}, the embedder is model {embedder.model_hash!r}."
        )
    return index


class RetrievalService:
    """The state behind the routes: embedder, index, limits and the image decoder."""

    def __init__(self, embedder: Embedder, index: EmbeddingIndex | None, limits: ServiceLimits):
        self.embedder, self.index, self.limits = embedder, index, limits
        self.decoder = ImageDecoder(embedder, limits)

    async def embed_request(self, blobs: list[bytes]) -> np.ndarray:
        """Decode and embed in the thread pool; 422 for bad images, 503 when the decode budget stays full."""
        from starlette.concurrency import run_in_threadpool  # noqa: PLC0415

        try:
            return await run_in_threadpool(self.decoder.embed, blobs)
        except ValueError as err:
            raise _http_error(422, str(err)) from err
        except ServiceBusy as err:
            raise _http_error(503, str(err), headers={"Retry-After": "1"}) from err

    def health(self) -> dict[str, Any]:
        idx, embedder = self.index, self.embedder
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
            "limits": self.limits.as_dict(),
        }

    async def embed(self, request) -> dict[str, Any]:
        blobs, _ = await read_images(request, self.limits.max_images)
        embeddings = await self.embed_request(blobs)
        return {
            "embeddings": embeddings.tolist(),
            "dimension": int(embeddings.shape[1]),
            "count": int(embeddings.shape[0]),
            "model_hash": self.embedder.model_hash,
        }

    async def search(self, request) -> dict[str, Any]:
        from starlette.concurrency import run_in_threadpool  # noqa: PLC0415

        idx = self.index
        if idx is None:
            raise _http_error(503, "This service was started without an index (--index); only /embed works.")
        k_raw = request.query_params.get("k")
        blobs, fields = await read_images(request, self.limits.max_images)
        k_raw = fields.get("k", k_raw)
        try:  # checked before the images are decoded
            k = self.limits.default_k if k_raw is None else parse_k(k_raw, self.limits.max_k)
        except ValueError as err:
            raise _http_error(422, str(err)) from err
        embeddings = await self.embed_request(blobs)
        ids, labels, scores = await run_in_threadpool(idx.search, embeddings, k)
        return {"k": min(k, idx.count), "results": search_results(ids, labels, scores),
                "model_hash": self.embedder.model_hash}  # fmt: skip

    def _threshold(self, raw: Any) -> float:
        if raw is None and self.index.threshold is None:
            raise _http_error(
                422, "No match threshold: pass threshold (in [-1, 1]), or calibrate the index "
                "(EmbeddingIndex.calibrate) so that it stores one."
            )
        try:
            return self.index.threshold if raw is None else parse_threshold(raw)
        except ValueError as err:
            raise _http_error(422, str(err)) from err

    async def match(self, request) -> dict[str, Any]:
        from starlette.concurrency import run_in_threadpool  # noqa: PLC0415

        idx = self.index
        if idx is None or idx.labels is None:
            raise _http_error(503, "/match needs an index with labels (--index); this service has none.")
        raw = request.query_params.get("threshold")
        blobs, fields = await read_images(request, self.limits.max_images)
        threshold = self._threshold(fields.get("threshold", raw))  # checked before the images are decoded
        embeddings = await self.embed_request(blobs)
        found = await run_in_threadpool(idx.match, embeddings, threshold)
        return {"threshold": found.threshold, "results": match_results(found), "model_hash": self.embedder.model_hash}


def _add_routes(app, service: RetrievalService) -> None:
    """``GET /health``, ``POST /embed``, ``/search``, ``/match``; the module has no ``__future__`` annotations,
    so FastAPI sees ``Request`` itself and passes the request."""
    from fastapi import Request  # noqa: PLC0415

    @app.get("/health")
    def health() -> dict[str, Any]:
        return service.health()

    @app.post("/embed")
    async def embed(request: Request) -> dict[str, Any]:
        return await service.embed(request)

    @app.post("/search")
    async def search(request: Request) -> dict[str, Any]:
        return await service.search(request)

    @app.post("/match")
    async def match(request: Request) -> dict[str, Any]:
        return await service.match(request)


def create_app(
    embedder: Embedder | str | os.PathLike,
    index: EmbeddingIndex | str | os.PathLike | None = None,
    limits: ServiceLimits | None = None,
    **limit_overrides: Any,
):
    """Build the FastAPI application.

    Args:
        embedder: an :class:`~detreg_runtime.embedder.Embedder` or an ONNX path.
        index: an :class:`~detreg_runtime.index.EmbeddingIndex`, an index folder
            (loaded with the embedder's model hash: an index of another model is
            refused) or ``None`` (``/search`` and ``/match`` answer 503).
        limits: a :class:`ServiceLimits` (default: its defaults).
        **limit_overrides: any :class:`ServiceLimits` field by name (e.g.
            ``max_images=8``), applied on top of ``limits``.

    Raises:
        ValueError: a bad limit or an unknown one, or the index belongs to another model.
    """
    _require_fastapi()
    from fastapi import FastAPI  # noqa: PLC0415

    if not isinstance(embedder, Embedder):
        embedder = Embedder(embedder)
    unknown = sorted(set(limit_overrides) - {f.name for f in dataclasses.fields(ServiceLimits)})
    if unknown:
        raise ValueError(f"Unknown service limits {unknown}; expected ServiceLimits fields.")
    limits = dataclasses.replace(limits or ServiceLimits(), **limit_overrides).resolve(embedder)
    service = RetrievalService(embedder, _load_index(index, embedder), limits)
    app = FastAPI(
        title="detreg-keras retrieval",
        version=detreg_version(),
        description="Embeds images with the exported DReg model (onnxruntime) and searches a faiss index.",
    )
    app.state.service = service
    app.state.embedder, app.state.index, app.state.limits = embedder, service.index, limits.as_dict()
    app.state.decode_budget = service.decoder.budget
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=limits.max_request_bytes)
    app.add_middleware(AdmissionMiddleware, max_inflight=limits.max_inflight)  # outermost: refuses before any read
    _add_routes(app, service)
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

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``detreg-serve`` / ``python -m detreg_runtime``."""
    parser = argparse.ArgumentParser(prog="detreg-serve", description="Serve /embed, /search and /match over HTTP.")
    parser.add_argument("--model", required=True, help="ONNX model from scripts/export_onnx.py (detreg-export-onnx)")
    parser.add_argument("--index", default=None, help="index folder from detreg-index build")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_BYTES / 2**20)
    parser.add_argument("--max-images", type=int, default=None,
                        help="images per request (default: --batch-size, one onnxruntime run per request)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_MAX_IMAGES, help="images per onnxruntime run")
    parser.add_argument("--max-k", type=int, default=DEFAULT_MAX_K)
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="largest image (width x height) accepted; default 256 x the model's H x W, "
                             f"at least {MIN_DEFAULT_PIXELS:,}, at most {MAX_PIXELS_CEILING:,}")
    parser.add_argument("--decode-pixel-budget", type=int, default=None,
                        help="pixels of all images being decoded at once (default: 2 x --max-pixels)")
    parser.add_argument("--max-inflight", type=int, default=DEFAULT_MAX_INFLIGHT,
                        help="requests admitted at once; more get 503 + Retry-After")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Start the service; 2 with a one-line ``error: ...`` for a bad model, index or limit."""
    args = build_parser().parse_args(argv)
    try:
        _require_fastapi()
        import uvicorn  # noqa: PLC0415

        embedder = Embedder(args.model, batch_size=args.batch_size, intra_op_num_threads=args.threads)
        limits = ServiceLimits(
            max_request_bytes=int(args.max_request_mb * 2**20),
            max_images=args.max_images,
            max_k=args.max_k,
            max_pixels=args.max_pixels,
            decode_pixel_budget=args.decode_pixel_budget,
            max_inflight=args.max_inflight,
        )
        app = create_app(embedder, args.index, limits)
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
    "ImageDecoder",
    "PixelBudget",
    "RetrievalService",
    "ServerThread",
    "ServiceBusy",
    "ServiceLimits",
    "build_parser",
    "create_app",
    "default_max_pixels",
    "main",
    "parse_k",
    "parse_threshold",
    "read_images",
]
