#!/usr/bin/env python
"""Client for the DReg embedding model on TF Serving: REST and gRPC.

REST (standard library only)::

    python serving/client.py rest --url http://127.0.0.1:8501 --model detreg a.jpg b.png
    python serving/client.py rest --url http://127.0.0.1:8501 --model detreg --version 1 a.jpg --output emb.npy
    python serving/client.py rest --url http://127.0.0.1:8501 --model detreg --pixels a.jpg

gRPC (needs ``pip install tensorflow-serving-api grpcio``, imported only for this command)::

    python serving/client.py grpc --target 127.0.0.1:8500 --model detreg a.jpg b.png

``serving_default`` (default) sends the encoded image bytes: the server decodes,
converts to RGB and resizes them. ``--pixels`` uses the ``serving_pixels``
signature instead: the client decodes/resizes the images with the runtime's
decoder, which gives the server graph's pixels bit for bit
(``detreg_runtime.imaging.load_image``: numpy/PIL, no TensorFlow; ``--pixels``
needs detreg-keras installed) and sends float pixels of the size and channels the
served signature declares (``GET .../metadata``; ``--image-size`` / ``--channels``
override it).
The REST request is ``POST /v1/models/NAME[/versions/N]:predict`` with
``{"signature_name": "serving_default", "instances": [{"b64": "..."}]}``.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BYTES_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "serving_pixels"
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"


def predict_url(base_url: str, model: str, version: int | None = None) -> str:
    base = base_url.rstrip("/")
    return f"{base}/v1/models/{model}" + (f"/versions/{int(version)}" if version else "") + ":predict"


def rest_payload(images: Sequence[bytes], signature: str = BYTES_SIGNATURE) -> dict:
    """The REST ``predict`` body for encoded images (row format, binary values as ``{"b64": ...}``)."""
    return {
        "signature_name": signature,
        "instances": [{"b64": base64.b64encode(data).decode("ascii")} for data in images],
    }


def _parse_predictions(body: dict) -> np.ndarray:
    if "error" in body:
        raise RuntimeError(f"TF Serving error: {body['error']}")
    if "predictions" in body:  # row format: one entry per instance (a dict when several outputs)
        rows = [p[OUTPUT_NAME] if isinstance(p, dict) else p for p in body["predictions"]]
        return np.asarray(rows, np.float32)
    if "outputs" in body:  # columnar format
        outputs = body["outputs"]
        return np.asarray(outputs[OUTPUT_NAME] if isinstance(outputs, dict) else outputs, np.float32)
    raise RuntimeError(f"Unexpected TF Serving response keys: {sorted(body)}")


def _request_json(url: str, timeout: float, payload: dict | None = None) -> dict:
    """GET ``url`` (or POST ``payload`` as JSON to it) and parse the JSON answer; HTTP errors name the URL."""
    data = None if payload is None else json.dumps(payload).encode()
    headers = {} if payload is None else {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if payload is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        raise RuntimeError(f"HTTP {err.code} from {url}: {detail}") from err


def rest_predict(
    base_url: str,
    model: str,
    images: Sequence[bytes],
    version: int | None = None,
    timeout: float = 30.0,
) -> np.ndarray:
    """Embeddings ``[N, D]`` of encoded images via the REST API and the ``serving_default`` signature."""
    return _parse_predictions(_request_json(predict_url(base_url, model, version), timeout, rest_payload(images)))


def metadata_url(base_url: str, model: str, version: int | None = None) -> str:
    """``BASE/v1/models/MODEL[/versions/N]/metadata`` (TF Serving's REST model metadata)."""
    return predict_url(base_url, model, version)[: -len(":predict")] + "/metadata"


def pixels_input_shape(metadata: dict) -> tuple[int, int, int]:
    """``(H, W, C)`` of the ``serving_pixels`` input in a TF Serving ``/metadata`` answer.

    Raises:
        RuntimeError: the answer has no ``serving_pixels`` signature with a fixed ``[batch, H, W, C]`` input.
    """
    try:
        signatures = metadata["metadata"]["signature_def"]["signature_def"]
        dims = signatures[PIXELS_SIGNATURE]["inputs"][INPUT_NAME]["tensor_shape"]["dim"]
        sizes = [int(d["size"]) for d in dims]
    except (KeyError, TypeError, ValueError) as err:
        raise RuntimeError(
            f"The model metadata has no {PIXELS_SIGNATURE} signature with an {INPUT_NAME!r} input "
            f"(missing {err}); was it exported by scripts/export_saved_model.py?"
        ) from err
    if len(sizes) != 4 or min(sizes[1:]) < 1:
        raise RuntimeError(f"{PIXELS_SIGNATURE} input shape {sizes} is not [batch, H, W, C] with a fixed H, W, C.")
    return sizes[1], sizes[2], sizes[3]


def load_pixels(paths: Sequence[str | Path], image_size: int | tuple[int, int], channels: int = 3) -> np.ndarray:
    """Decode + resize as the server's ``serving_default`` graph does: float32 ``[N, H, W, C]`` in [0, 255].

    Raises:
        ImportError: detreg-keras (its runtime decoder) is not installed.
        ValueError: an image cannot be read or decoded.
    """
    try:
        from detreg_runtime.imaging import load_image  # noqa: PLC0415
    except ImportError as err:
        raise ImportError(
            "--pixels decodes the images with detreg-keras's decoder (the one the SavedModel uses): "
            f"pip install detreg-keras, or send encoded images without --pixels (missing: {err.name or err})."
        ) from err
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return np.stack([load_image(path, size, channels) for path in paths])


def rest_pixels_shape(base_url: str, model: str, version: int | None = None, timeout: float = 30.0):
    """``(H, W, C)`` the served ``serving_pixels`` signature takes (from ``GET .../metadata``)."""
    return pixels_input_shape(_request_json(metadata_url(base_url, model, version), timeout))


def rest_predict_pixels(
    base_url: str,
    model: str,
    pixels: np.ndarray,
    version: int | None = None,
    timeout: float = 60.0,
) -> np.ndarray:
    """Embeddings of float pixels ``[N, H, W, C]`` via the ``serving_pixels`` signature."""
    payload = {"signature_name": PIXELS_SIGNATURE, "instances": np.asarray(pixels, np.float32).tolist()}
    return _parse_predictions(_request_json(predict_url(base_url, model, version), timeout, payload))


def _grpc_modules():
    try:
        import grpc  # noqa: PLC0415
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: PLC0415
    except ImportError as err:
        raise ImportError(
            "The gRPC client needs the TF Serving API: pip install tensorflow-serving-api grpcio "
            f"(missing: {err.name or err})."
        ) from err
    return grpc, predict_pb2, prediction_service_pb2_grpc


def grpc_predict(
    target: str,
    model: str,
    images: Sequence[bytes],
    version: int | None = None,
    signature: str = BYTES_SIGNATURE,
    timeout: float = 30.0,
) -> np.ndarray:
    """Embeddings ``[N, D]`` of encoded images via gRPC ``PredictionService/Predict``.

    Raises:
        ImportError: ``tensorflow-serving-api`` (or ``grpcio``) is not installed.
    """
    grpc, predict_pb2, prediction_service_pb2_grpc = _grpc_modules()
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2  # noqa: PLC0415

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version:
        request.model_spec.version.value = int(version)
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(images))]),
        string_val=list(images),
    )
    request.inputs[INPUT_NAME].CopyFrom(tensor)
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 * 2**20)]) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout=timeout)
    output = response.outputs[OUTPUT_NAME]
    shape = [d.size for d in output.tensor_shape.dim]
    return np.asarray(output.float_val, np.float32).reshape(shape)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="protocol", required=True)
    rest = sub.add_parser("rest", help="REST API (port 8501)")
    rest.add_argument("--url", default="http://127.0.0.1:8501")
    rest.add_argument("--pixels", action="store_true", help="use serving_pixels (client-side decode/resize)")
    rest.add_argument("--image-size", type=int, default=None,
                      help="with --pixels: image size (default: from the served signature)")
    rest.add_argument("--channels", type=int, choices=(1, 3), default=None,
                      help="with --pixels: 1 or 3 channels (default: from the served signature)")
    grpc_cmd = sub.add_parser("grpc", help="gRPC API (port 8500), needs tensorflow-serving-api")
    grpc_cmd.add_argument("--target", default="127.0.0.1:8500")
    for p in (rest, grpc_cmd):
        p.add_argument("--model", default="detreg", help="model name in models.config")
        p.add_argument("--version", type=int, default=None, help="model version (default: newest)")
        p.add_argument("--timeout", type=float, default=30.0)
        p.add_argument("--output", default=None, help="save the embeddings as .npy")
        p.add_argument("images", nargs="+", help="image files")
    args = parser.parse_args(argv)
    try:
        if args.protocol == "rest" and args.pixels:
            if args.image_size is None or args.channels is None:
                height, width, channels = rest_pixels_shape(args.url, args.model, args.version, args.timeout)
            size = (args.image_size, args.image_size) if args.image_size else (height, width)
            pixels = load_pixels(args.images, size, args.channels or channels)
            embeddings = rest_predict_pixels(args.url, args.model, pixels, args.version, args.timeout)
        else:
            blobs = [Path(p).read_bytes() for p in args.images]
            if args.protocol == "rest":
                embeddings = rest_predict(args.url, args.model, blobs, args.version, args.timeout)
            else:
                embeddings = grpc_predict(args.target, args.model, blobs, args.version, timeout=args.timeout)
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.output:
        np.save(args.output, embeddings, allow_pickle=False)
    print(json.dumps({
        "shape": list(embeddings.shape),
        "norms": [round(float(n), 6) for n in np.linalg.norm(embeddings, axis=1)],
        "first_values": [[round(float(v), 6) for v in row[:4]] for row in embeddings],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
