"""Export the inference path of a DReg model: ONNX (onnxruntime) and SavedModel (TF Serving).

Only the retrieval embedding is exported::

    images (float32 NHWC raw pixels in [0, 255]) ─ backbone (with its own
    preprocessing) ─ GAP+GMP ─ Dense ─ flow_min ("head 1") ─ L2 ─ embeddings

The maximising head (``flow_max``), the proxies and the loss layers are
training-only and never reach an exported graph.

* :func:`export_onnx` converts ``model.call`` with ``tf2onnx.convert.from_function``
  and an explicit input signature (``tf2onnx.convert.from_keras`` is fragile on
  Keras 3), writes provenance into the ONNX ``metadata_props`` (input/output
  names, image size, channels, preprocessing, embedding dimension, detreg
  version and :func:`model_hash`), and runs a parity check onnxruntime vs Keras
  before the file appears at its final path.
* :func:`export_saved_model` writes ``BASE/NAME/VERSION/`` for TF Serving with
  ``keras.export.ExportArchive``: a ``serving_default`` signature taking encoded
  images (``tf.string [None]``: JPEG/PNG/BMP/GIF/WebP bytes, decoded by
  :func:`decode_image_tensor` and resized in the graph) and a ``serving_pixels``
  signature taking float pixels ``[None, H, W, C]``; both return
  ``{"embeddings": float32 [None, D]}``. Before the version appears, both are
  restored as TF Serving restores them (:func:`session_predict`, a TF1 session)
  and compared with Keras (:func:`check_saved_model_parity`).

Neither function overwrites an existing output unless ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from detreg_runtime._version import detreg_version
from detreg_runtime.embedder import THRESHOLD_METADATA_KEY
from detreg_runtime.imaging import GRAY_WEIGHTS

#: Default ONNX opset (supported by onnxruntime >= 1.12 and TensorRT 8.x).
DEFAULT_OPSET = 17
#: Parity tolerance (max abs difference between onnxruntime and Keras embeddings).
PARITY_ATOL = 1e-5
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
BYTES_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "serving_pixels"
METADATA_FILENAME = "detreg_metadata.json"
PREPROCESSING_NOTE = (
    "float32 NHWC RGB raw pixels in [0, 255], resized to the model's size by the caller; "
    "normalisation (e.g. caffe mean subtraction) is inside the graph. "
    "Output: L2-normalised embeddings of the minimising flow head; compare with inner product."
)


class ParityError(RuntimeError):
    """The exported graph does not reproduce the Keras embeddings within tolerance."""


@dataclass
class ExportResult:
    """What an export wrote.

    Attributes:
        path: the ONNX file or the SavedModel version directory.
        model_hash: :func:`model_hash` of the exported model.
        max_abs_diff: largest parity difference observed (``None`` when unchecked).
        metadata: the metadata written with the export.
    """

    path: Path
    model_hash: str
    max_abs_diff: float | None
    metadata: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------- helpers
def load_model(model_or_path: keras.Model | str | os.PathLike) -> keras.Model:
    """``model_or_path`` itself if it is a Keras model, else :func:`detreg_keras.model.load_model` of it (uncompiled).

    Args:
        model_or_path: a model, a ``.keras`` file or a run directory holding ``model.keras``.

    Raises:
        FileNotFoundError, ValueError, TypeError: as :func:`detreg_keras.model.load_model`
            (missing file, damaged archive, neither a model nor a path).
    """
    if isinstance(model_or_path, keras.Model):
        return model_or_path
    from detreg_keras.model import load_model as load_saved_model  # noqa: PLC0415  (registers the custom objects)

    return load_saved_model(model_or_path, compile=False)


def image_shape(model: keras.Model) -> tuple[int, int, int]:
    """``(height, width, channels)`` the model takes (from ``model.backbone`` for a DRegModel).

    Raises:
        ValueError: the input is not rank 4 or has an unknown spatial size / channels.
    """
    backbone = getattr(model, "backbone", None)
    source = backbone if isinstance(backbone, keras.Model) else model
    try:
        shape = tuple(source.input_shape)
    except (AttributeError, ValueError) as err:
        raise ValueError(f"Cannot read the input shape of {model.name!r}: {err}") from err
    if len(shape) != 4 or any(d is None for d in shape[1:]):
        raise ValueError(
            f"Export needs a fixed NHWC image input (None, H, W, C); {model.name!r} takes {shape}."
        )
    return int(shape[1]), int(shape[2]), int(shape[3])


def _ensure_built(model: keras.Model, shape: tuple[int, int, int]) -> None:
    if not model.built or not model.weights:
        model(np.zeros((1,) + shape, np.float32), training=False)


def inference_variables(model: keras.Model) -> list:
    """Variables that determine the exported embedding, in a stable order.

    For a DRegModel: backbone, embedding layer and the minimising flow (head 1);
    head 2, proxies and optimizer state are excluded, so two models with the same
    inference weights hash alike. Any other model: all of ``model.weights``.
    """
    parts = []
    if hasattr(model, "backbone") and hasattr(model, "embedding") and hasattr(model, "flow_min"):
        parts = [model.backbone.weights, model.embedding.weights]
        if model.flow_min is not None:
            parts.append(model.flow_min.weights)
    else:
        parts = [model.weights]
    seen: set[int] = set()
    out = []
    for group in parts:
        for variable in group:
            if id(variable) not in seen:
                seen.add(id(variable))
                out.append(variable)
    return out


def model_hash(model: keras.Model) -> str:
    """sha256 (hex) of the inference weights (:func:`inference_variables`): shapes, dtypes and values.

    Stored in the ONNX metadata, the SavedModel metadata and every index built
    from the model, so a retrieval index refuses embeddings of another model.
    """
    digest = hashlib.sha256(b"detreg-keras-weights-v1\n")
    for i, variable in enumerate(inference_variables(model)):
        value = np.asarray(keras.ops.convert_to_numpy(variable))
        value = np.ascontiguousarray(value.astype(value.dtype.newbyteorder("<"), copy=False))
        digest.update(f"{i}:{value.dtype.str}:{value.shape}\n".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def sample_images(batch: int, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A deterministic batch of float32 images in [0, 255] (parity checks)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 255.0, (int(batch),) + tuple(shape)).astype(np.float32)


def export_metadata(model: keras.Model, opset: int | None = None) -> dict[str, str]:
    """Provenance written into ONNX ``metadata_props`` and SavedModel ``assets.extra``."""
    height, width, channels = image_shape(model)
    dim = int(model.compute_output_shape((None, height, width, channels))[-1])
    meta = {
        "producer": "detreg_keras",
        "detreg_version": detreg_version(),
        "model_name": model.name,
        "model_hash": model_hash(model),
        "model_hash_algorithm": "sha256 of the inference weights (detreg_keras.export.model_hash)",
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_layout": "NHWC",
        "input_dtype": "float32",
        "image_size": str(height) if height == width else f"{height}x{width}",
        "image_height": str(height),
        "image_width": str(width),
        "channels": str(channels),
        "preprocessing": PREPROCESSING_NOTE,
        "embedding_dim": str(dim),
        "l2_normalized": "true",
        "similarity": "inner_product",
        "flow": str(getattr(model, "flow_type", "unknown")),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if opset is not None:
        meta["opset"] = str(opset)
    return meta


def inference_function(model: keras.Model) -> tf.types.experimental.GenericFunction:
    """``tf.function`` ``images [None, H, W, C] float32 -> {"embeddings": [None, D]}`` (inference mode)."""
    shape = image_shape(model)
    spec = tf.TensorSpec([None, *shape], tf.float32, name=INPUT_NAME)

    @tf.function(input_signature=[spec])
    def embed(images):
        return {OUTPUT_NAME: tf.cast(model(images, training=False), tf.float32)}

    return embed


def _check_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")


def _rename_batch_dim(model_proto, name: str = "batch") -> None:
    """Give the dynamic batch dimension of the graph inputs/outputs a readable name."""
    graph = model_proto.graph
    old = set()
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            old.add(dims[0].dim_param)
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in old:
                dim.dim_param = name


# -------------------------------------------------------------------- ONNX
def check_onnx_parity(
    model: keras.Model,
    onnx_path: str | os.PathLike,
    batch_sizes: Sequence[int] = (1, 7),
    images: np.ndarray | None = None,
    atol: float = PARITY_ATOL,
) -> float:
    """Compare onnxruntime (CPU) with Keras on sample batches; return the max abs difference.

    Args:
        model: the Keras model that was exported.
        onnx_path: the ONNX file.
        batch_sizes: sizes of the random batches checked (ignored when ``images`` is given).
        images: optional float32 NHWC batch to check instead of random images.
        atol: tolerance.

    Raises:
        ParityError: the difference exceeds ``atol`` (or the output shape differs).
    """
    from detreg_runtime.embedder import import_onnxruntime  # noqa: PLC0415

    ort = import_onnxruntime()
    shape = image_shape(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    batches = [np.asarray(images, np.float32)] if images is not None else [
        sample_images(b, shape, seed=i) for i, b in enumerate(batch_sizes)
    ]
    worst = 0.0
    for batch in batches:
        expected = keras.ops.convert_to_numpy(model(batch, training=False)).astype(np.float32)
        got = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        if got.shape != expected.shape:
            raise ParityError(f"ONNX output shape {got.shape} != Keras output shape {expected.shape}.")
        diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
        if not np.isfinite(diff):
            raise ParityError("ONNX or Keras embeddings contain NaN/inf on the sample batch.")
        worst = max(worst, diff)
        if diff > atol:
            raise ParityError(
                f"onnxruntime and Keras embeddings differ by {diff:.3g} > {atol:g} at batch size {len(batch)}."
            )
    return worst


def export_onnx(
    model_or_path: keras.Model | str | os.PathLike,
    output_path: str | os.PathLike,
    opset: int | None = None,
    overwrite: bool = False,
    check: bool = True,
    check_batch_sizes: Sequence[int] = (1, 7),
    check_images: np.ndarray | None = None,
    atol: float = PARITY_ATOL,
    extra_metadata: dict[str, str] | None = None,
) -> ExportResult:
    """Export the inference path to ONNX (dynamic batch, NHWC float32 input ``images``, output ``embeddings``).

    Args:
        model_or_path: a DRegModel (or any image→embedding ``keras.Model``), a
            ``.keras`` file or a run directory holding ``model.keras``.
        output_path: the ``.onnx`` file to write.
        opset: ONNX opset (default :data:`DEFAULT_OPSET`).
        overwrite: replace an existing ``output_path``.
        check: run :func:`check_onnx_parity` before publishing the file.
        check_batch_sizes: batch sizes of the parity check.
        check_images: optional real images for the parity check.
        atol: parity tolerance (default 1e-5).
        extra_metadata: more ``metadata_props`` (string values).

    Returns:
        :class:`ExportResult`.

    Raises:
        FileExistsError: ``output_path`` exists and ``overwrite`` is False.
        ParityError: onnxruntime and Keras disagree by more than ``atol``; no file is written.
    """
    import onnx  # noqa: PLC0415
    import tf2onnx  # noqa: PLC0415

    output_path = Path(output_path)
    _check_writable(output_path, overwrite)
    model = load_model(model_or_path)
    shape = image_shape(model)
    _ensure_built(model, shape)
    opset = int(opset) if opset is not None else DEFAULT_OPSET

    function = inference_function(model)
    spec = function.input_signature
    model_proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=opset)

    inputs = [i.name for i in model_proto.graph.input]
    outputs = [o.name for o in model_proto.graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:  # tf2onnx names them after the signature
        raise RuntimeError(
            f"Unexpected ONNX I/O names {inputs} -> {outputs}; expected [{INPUT_NAME}] -> [{OUTPUT_NAME}]."
        )
    _rename_batch_dim(model_proto)

    meta = export_metadata(model, opset)
    meta["tf2onnx_version"] = tf2onnx.__version__
    meta.update({str(k): str(v) for k, v in (extra_metadata or {}).items()})
    del model_proto.metadata_props[:]
    for key, value in meta.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value
    model_proto.producer_name = "detreg_keras"
    model_proto.producer_version = meta["detreg_version"]
    model_proto.doc_string = "DReg embedding (minimising flow head). " + PREPROCESSING_NOTE
    onnx.checker.check_model(model_proto)

    output_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output_path.name}.", suffix=".tmp", dir=output_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        tmp.write_bytes(model_proto.SerializeToString())
        max_diff = (
            check_onnx_parity(model, tmp, check_batch_sizes, check_images, atol) if check else None
        )
        if overwrite:
            os.replace(tmp, output_path)
        else:
            try:
                os.link(tmp, output_path)  # atomic, fails if the path appeared meanwhile
            except FileExistsError:
                raise FileExistsError(f"{output_path} appeared during the export; not overwriting it.") from None
            except OSError:  # no hard links on this file system
                _check_writable(output_path, overwrite=False)
                os.replace(tmp, output_path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(output_path, meta["model_hash"], max_diff, meta)


def threshold_metadata(threshold) -> dict[str, str]:
    """``extra_metadata`` for :func:`export_onnx` that stores a verification (match) threshold.

    Args:
        threshold: a cosine threshold in ``[-1, 1]``, e.g. ``EmbeddingIndex.threshold``
            after :meth:`~detreg_runtime.index.EmbeddingIndex.calibrate`.

    Raises:
        ValueError: not a number in ``[-1, 1]``.
    """
    from detreg_runtime.verification import check_threshold  # noqa: PLC0415

    return {THRESHOLD_METADATA_KEY: repr(check_threshold(threshold))}


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (reads the graph, not only the header)."""
    import onnx  # noqa: PLC0415

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def onnx_op_counts(path_or_proto) -> dict[str, int]:
    """Count of each op type in an ONNX graph (e.g. to check there are no Transposes around convs)."""
    import onnx  # noqa: PLC0415

    proto = path_or_proto if hasattr(path_or_proto, "graph") else onnx.load(str(path_or_proto))
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


# -------------------------------------------------------------- SavedModel
def serving_archive(model: keras.Model, shape: tuple[int, int, int]) -> keras.export.ExportArchive:
    """A ``keras.export.ExportArchive`` with the two TF Serving signatures over the inference layers.

    ``ExportArchive`` saves the ``tf.Variable`` handles the endpoint graphs
    capture, so TF1-style session loaders (TF Serving's ``SavedModelBundle``,
    ``saved_model_cli run``) restore all of them; with ``tf.saved_model.save`` of
    a module tracking the Keras 3 layers, many of the captured handles were
    never restored there ("Could not find variable ...", keras#20095). No layer
    is tracked on top (``track`` saves every variable a second time, through its
    ``keras.Variable`` wrapper), so the SavedModel holds exactly the inference
    weights, once: no head 2, proxies or optimizer state.
    """
    height, width, channels = shape
    pixel_spec = tf.TensorSpec([None, height, width, channels], tf.float32, name=INPUT_NAME)
    bytes_spec = tf.TensorSpec([None], tf.string, name=INPUT_NAME)

    def serve_pixels(images):
        return {OUTPUT_NAME: tf.cast(model(images, training=False), tf.float32)}

    def serve_bytes(images):
        return serve_pixels(decode_images(images, shape))

    archive = keras.export.ExportArchive()  # tracks exactly the variables the endpoints read
    archive.add_endpoint(BYTES_SIGNATURE, serve_bytes, input_signature=[bytes_spec])
    archive.add_endpoint(PIXELS_SIGNATURE, serve_pixels, input_signature=[pixel_spec])
    return archive


def _resize(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    # uint8 in, float32 out: bit-identical to resizing a float32 copy, without that
    # copy (4 bytes per pixel and channel) of a possibly large image.
    image = tf.image.resize(image, [height, width], method="bilinear", antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)


def _resize_gray(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """A decoded ``[h, w, 1-4]`` uint8 image (native channels) to float32 ``[H, W, 1]`` gray."""
    image.set_shape([None, None, None])

    def from_gray() -> tf.Tensor:
        return _resize(image[..., :1], height, width)  # gray or gray + alpha: exact, no conversion

    def from_rgb() -> tf.Tensor:
        rgb = image[..., :3]  # alpha dropped
        rgb.set_shape([None, None, 3])
        resized = _resize(rgb, height, width)
        return tf.reduce_sum(resized * tf.constant(GRAY_WEIGHTS, tf.float32), axis=-1, keepdims=True)

    gray = tf.cond(tf.shape(image)[-1] < 3, from_gray, from_rgb)
    gray.set_shape([height, width, 1])
    return gray


def decode_image_tensor(data: tf.Tensor, shape: tuple[int, int, int]) -> tf.Tensor:
    """Decode one encoded image (``tf.string`` scalar) to float32 ``[H, W, C]`` raw pixels in [0, 255].

    The in-graph twin of :func:`detreg_runtime.imaging.load_image` (numpy/PIL,
    used by the Embedder, the HTTP service, the index CLI and ``serving/client.py
    --pixels``), which reproduces it bit for bit (``tests/test_imaging.py``): the
    SavedModel's ``serving_default`` signature runs this one in the graph, so an
    image file gives the same pixels everywhere. It decodes
    like the training pipeline (:func:`detreg_keras.data.pipeline.decode_image`):
    ``tf.io.decode_image(dtype=uint8)`` (JPEG/PNG/BMP/GIF/WebP, first frame;
    16-bit scaled to 8 bits, not clipped; alpha dropped without compositing),
    RGB for ``C == 3`` (gray replicated), then an antialiased bilinear resize to
    ``(H, W)``. For ``C == 1`` a gray image stays as it is and a color one is
    resized, then weighted with ``tf.image.rgb_to_grayscale``'s luma weights.
    Memory: about 3 bytes per decoded pixel (the uint8 image), which is what
    ``max_pixels`` caps in the HTTP service.

    Args:
        data: a scalar ``tf.string`` with the file content.
        shape: ``(H, W, C)`` of the result, ``C`` 1 or 3.

    Raises:
        ValueError: ``C`` is not 1 or 3.
        tf.errors.InvalidArgumentError: undecodable data (at run time).
    """
    height, width, channels = shape
    if channels not in (1, 3):
        raise ValueError(f"Encoded images can feed 1- or 3-channel models only, this one has {channels} channels.")
    if channels == 3:
        image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
        image.set_shape([None, None, 3])
        return _resize(image, height, width)
    native = tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)
    return _resize_gray(native, height, width)


def decode_images(encoded: tf.Tensor, shape: tuple[int, int, int]) -> tf.Tensor:
    """Decode a ``tf.string [B]`` batch with :func:`decode_image_tensor` to float32 ``[B, H, W, C]``."""
    height, width, channels = shape
    return tf.map_fn(
        lambda data: decode_image_tensor(data, shape),
        encoded,
        fn_output_signature=tf.TensorSpec([height, width, channels], tf.float32),
    )


def export_saved_model(
    model_or_path: keras.Model | str | os.PathLike,
    base_dir: str | os.PathLike,
    name: str,
    version: int,
    overwrite: bool = False,
    check: bool = True,
    atol: float = PARITY_ATOL,
) -> ExportResult:
    """Write a TF Serving SavedModel at ``base_dir/name/version/``.

    Signatures (both return ``{"embeddings": float32 [None, D]}``):

    * ``serving_default``: ``images`` ``tf.string [None]``, encoded JPEG/PNG/BMP/GIF
      bytes (REST: ``{"instances": [{"b64": "..."}]}``), decoded/resized in the graph;
    * ``serving_pixels``: ``images`` float32 ``[None, H, W, C]`` raw pixels in [0, 255].

    The version is written to a hidden temporary folder and renamed when
    complete, so a TF Serving instance polling ``base_dir/name`` never loads a
    half-written version. ``assets.extra/detreg_metadata.json`` holds the
    provenance (model hash, image size, ...).

    Raises:
        FileExistsError: the version folder exists and ``overwrite`` is False.
        ValueError: ``version`` is not a positive integer or ``name`` is not a plain folder name.
        ParityError: the saved ``serving_pixels`` signature disagrees with Keras.
    """
    version = int(version)
    if version < 1:
        raise ValueError(f"TF Serving versions are positive integers, got {version}.")
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"Model name must be a plain folder name, got {name!r}.")
    model_dir = Path(base_dir) / name
    target = model_dir / str(version)
    _check_writable(target, overwrite)
    model = load_model(model_or_path)
    shape = image_shape(model)
    _ensure_built(model, shape)

    archive = serving_archive(model, shape)
    meta = export_metadata(model)
    meta["signatures"] = f"{BYTES_SIGNATURE} (tf.string images), {PIXELS_SIGNATURE} (float32 images)"

    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; the server may run as another user
        archive.write_out(str(tmp), verbose=False)
        extra = tmp / "assets.extra"
        extra.mkdir(exist_ok=True)
        (extra / METADATA_FILENAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        max_diff = check_saved_model_parity(model, tmp, atol=atol) if check else None
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} already exists; pass overwrite=True (CLI: --overwrite).")
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(target, meta["model_hash"], max_diff, meta)


def session_predict(
    version_dir: str | os.PathLike, requests: Sequence[tuple[str, np.ndarray]]
) -> list[np.ndarray]:
    """Run signatures of a SavedModel the way TF Serving does: restored into a TF1 session.

    TF Serving (``SavedModelBundle``), ``saved_model_cli run`` and
    ``tf.compat.v1.saved_model.loader.load`` restore the graph and its variables
    into a session, which fails on variables ``tf.saved_model.load`` never
    misses; this is the loader a served model has to pass.

    Args:
        version_dir: the SavedModel folder (``BASE/NAME/VERSION``).
        requests: ``(signature name, input array)`` pairs (``images`` input).

    Returns:
        The ``embeddings`` output of each request, as float32 arrays.

    Raises:
        KeyError: a signature is not in the SavedModel.
        tf.errors.OpError: the session cannot run the graph (e.g. unrestored variables).
    """
    v1 = tf.compat.v1
    graph = tf.Graph()
    outputs = []
    logger = tf.get_logger()
    level = logger.level
    with graph.as_default(), v1.Session(graph=graph) as session:
        logger.setLevel("ERROR")  # loader.load's deprecation notice: it is the loader TF Serving uses
        try:
            meta_graph = v1.saved_model.loader.load(session, [tf.saved_model.SERVING], str(version_dir))
        finally:
            logger.setLevel(level)
        for name, array in requests:
            if name not in meta_graph.signature_def:
                raise KeyError(f"No signature {name!r} in {version_dir}; it has {sorted(meta_graph.signature_def)}.")
            signature = meta_graph.signature_def[name]
            feed = {signature.inputs[INPUT_NAME].name: array}
            outputs.append(np.asarray(session.run(signature.outputs[OUTPUT_NAME].name, feed), np.float32))
    return outputs


def _encode_png(pixels: np.ndarray) -> np.ndarray:
    """A ``[B]`` object array of PNG bytes of uint8 ``[B, H, W, C]`` pixels (lossless: same pixels decoded)."""
    return np.array([tf.io.encode_png(image).numpy() for image in pixels], dtype=object)


def check_saved_model_parity(
    model: keras.Model,
    saved_model_dir: str | os.PathLike,
    batch_sizes: Sequence[int] = (1, 3),
    atol: float = PARITY_ATOL,
    signatures: Sequence[str] = (PIXELS_SIGNATURE, BYTES_SIGNATURE),
) -> float:
    """Compare both signatures, restored as TF Serving restores them (:func:`session_predict`), with Keras.

    ``serving_pixels`` gets float pixels, ``serving_default`` PNG encodings of the
    same (integer) pixels at the model's size, so both must reproduce the Keras
    embeddings; each batch size in ``batch_sizes`` is checked, for each of ``signatures``.

    Returns:
        The largest absolute difference observed.

    Raises:
        ParityError: a difference above ``atol``, a wrong output shape, or the
            session loader cannot run the SavedModel.
    """
    shape = image_shape(model)
    batches = [np.round(sample_images(b, shape, seed=i + 1)) for i, b in enumerate(batch_sizes)]
    requests, inputs = [], []
    for name in signatures:
        for x in batches:
            requests.append((name, _encode_png(x.astype(np.uint8)) if name == BYTES_SIGNATURE else x))
            inputs.append(x)
    try:
        outputs = session_predict(saved_model_dir, requests)
    except tf.errors.OpError as err:
        raise ParityError(
            f"The SavedModel fails under the TF1 session loader TF Serving uses: {type(err).__name__}: "
            f"{err.message.strip().splitlines()[0]}"
        ) from err
    worst = 0.0
    for (name, _), got, x in zip(requests, outputs, inputs):
        expected = keras.ops.convert_to_numpy(model(x, training=False)).astype(np.float32)
        if got.shape != expected.shape:
            raise ParityError(f"SavedModel {name} output shape {got.shape} != Keras output shape {expected.shape}.")
        diff = float(np.max(np.abs(got - expected)))
        if not diff <= atol:
            raise ParityError(
                f"SavedModel {name} and Keras embeddings differ by {diff:.3g} > {atol:g} at batch size {len(x)}."
            )
        worst = max(worst, diff)
    return worst


def read_saved_model_metadata(version_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``assets.extra/detreg_metadata.json`` of an exported SavedModel version."""
    return json.loads((Path(version_dir) / "assets.extra" / METADATA_FILENAME).read_text())


__all__ = [
    "BYTES_SIGNATURE",
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "PARITY_ATOL",
    "PIXELS_SIGNATURE",
    "THRESHOLD_METADATA_KEY",
    "ExportResult",
    "ParityError",
    "check_onnx_parity",
    "check_saved_model_parity",
    "decode_image_tensor",
    "decode_images",
    "export_metadata",
    "export_onnx",
    "export_saved_model",
    "image_shape",
    "inference_function",
    "inference_variables",
    "load_model",
    "model_hash",
    "onnx_op_counts",
    "read_onnx_metadata",
    "read_saved_model_metadata",
    "sample_images",
    "serving_archive",
    "session_predict",
    "threshold_metadata",
]
