"""Retrieval with an exported model: onnxruntime embeddings and a faiss index.

* :class:`Embedder` runs the ONNX file written by :func:`detreg_keras.export.export_onnx`
  with onnxruntime (CUDA when ``onnxruntime-gpu`` is installed, else CPU; all
  graph optimisations on) in batches. It takes NHWC ``uint8``/float arrays of
  raw pixels or image files / encoded bytes (decoded by :func:`load_image` with
  the SavedModel's own TF decoder, converted to RGB or grayscale, resized to
  the model's size) and returns float32 L2-normalised embeddings.
* :class:`EmbeddingIndex` stores embeddings with their ids and labels in a faiss
  index: exact inner product (``"flat"``, ``IndexFlatIP``) or approximate
  (``"ivf"``: IVF-Flat with ``nlist``/``nprobe``; ``"hnsw"``: HNSW with
  ``M``/``ef_search``). Embeddings are unit vectors, so inner product is cosine
  similarity. ``save``/``load`` use faiss's own ``write_index``/``read_index``,
  ``.npy`` arrays loaded with ``allow_pickle=False`` and a JSON metadata file —
  no pickle anywhere; the metadata stores the sha256 of each file, and ``load``
  refuses files that changed since ``save``, an index built by another model
  (model hash) or of another dimension.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import platform
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Image file extensions considered by :func:`list_image_folder` (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
INDEX_KINDS = ("flat", "ivf", "hnsw")
INDEX_FORMAT = "detreg-embedding-index"
INDEX_FORMAT_VERSION = 2  # 2: sha256 checksums of the files in the metadata
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
LABELS_FILE = "labels.npy"
METADATA_FILE = "metadata.json"

def _detreg_version() -> str:
    from detreg_keras.export import detreg_version  # noqa: PLC0415

    return detreg_version()


def _file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ images
_DECODERS: dict[tuple[int, int, int], Any] = {}
_DECODERS_LOCK = threading.Lock()


def _decoder(shape: tuple[int, int, int]):
    """The traced :func:`detreg_keras.export.decode_image_tensor` for ``shape`` (traced once per shape)."""
    with _DECODERS_LOCK:
        if shape not in _DECODERS:
            import tensorflow as tf  # noqa: PLC0415

            from detreg_keras.export import decode_image_tensor  # noqa: PLC0415

            function = tf.function(
                lambda data: decode_image_tensor(data, shape), input_signature=[tf.TensorSpec([], tf.string)]
            )
            _DECODERS[shape] = function.get_concrete_function()  # calling it directly skips the dispatch
        return _DECODERS[shape]


def _read_source(source: str | os.PathLike | bytes | io.IOBase, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            return Path(source).read_bytes()
        except FileNotFoundError as err:
            raise ValueError(f"Image file not found: {name}") from err
        except OSError as err:
            raise ValueError(f"Cannot read image {name}: {err}") from err
    if hasattr(source, "read"):
        return bytes(source.read())
    raise ValueError(f"Cannot read an image from an object of type {type(source).__name__}.")  # noqa: TRY004


def image_header_size(data: bytes, name: str = "<bytes>") -> tuple[int, int]:
    """``(width, height)`` from the header of encoded image bytes, without decoding the pixels.

    Raises:
        ValueError: the bytes are not an image PIL can identify.
    """
    from PIL import Image  # noqa: PLC0415

    try:
        with Image.open(io.BytesIO(data)) as image:
            return int(image.width), int(image.height)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as err:
        raise ValueError(f"Cannot decode image {name}: {type(err).__name__}: {err}") from err


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG colour types PIL and TensorFlow decode to the same 8-bit pixels: 0 gray, 2 RGB, 3 palette, 4 gray+alpha, 6 RGBA.
_PNG_SAME_PIXELS = {3: (0, 2, 3, 4, 6), 1: (0, 4)}  # model channels -> colour types (1 channel: gray ones only)


def _png_needs_no_tf(data: bytes, size: tuple[int, int], channels: int) -> bool:
    """Whether PIL gives exactly :func:`~detreg_keras.export.decode_image_tensor`'s pixels for ``data``.

    True for an 8-bit PNG already at the model's size (TF's resize to the same
    size is the identity) whose colour type converts alike in both libraries
    (any for RGB models; gray and gray+alpha for 1-channel models, where TF's
    colour-to-gray weights would differ from PIL's). Tested bit for bit
    (``tests/test_export.py``); everything else goes through TensorFlow.
    """
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return False
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    bit_depth, colour_type = data[24], data[25]
    return (height, width) == tuple(size) and bit_depth == 8 and colour_type in _PNG_SAME_PIXELS[channels]


def _pil_pixels(data: bytes, channels: int, name: str) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415

    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.float32)
    except (OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"Cannot decode image {name}: {type(err).__name__}: {err}") from err
    return array if array.ndim == 3 else array[..., None]


def load_image(
    source: str | os.PathLike | bytes | io.IOBase,
    size: tuple[int, int],
    channels: int = 3,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Decode an image file or encoded bytes to float32 ``[H, W, C]`` raw pixels in [0, 255].

    Runs :func:`detreg_keras.export.decode_image_tensor`, the decoder of the
    SavedModel's ``serving_default`` signature and of the training pipeline, so
    the same file gives the same pixels here, in TF Serving and in training
    (e.g. a 16-bit PNG is scaled to 8 bits, not clipped). Only 8-bit PNGs
    already at the model's size, for which PIL's pixels are provably the same
    (see ``_png_needs_no_tf``), are read with PIL, 15x faster. JPEG/PNG/BMP/GIF/WebP;
    RGB (``channels=3``, alpha dropped) or grayscale (``channels=1``), resized to
    ``size = (H, W)`` with an antialiased bilinear filter. EXIF orientation is
    not applied.

    Args:
        source: a path, encoded bytes or a binary file object.
        size: ``(H, W)`` of the result.
        channels: 3 (RGB) or 1 (grayscale).
        max_pixels: refuse images larger than this (width × height), read from
            the header before any pixel is decoded.

    Raises:
        ValueError: the source cannot be read or decoded, is larger than
            ``max_pixels``, or ``channels`` is not 1 or 3.
    """
    if channels not in (1, 3):
        raise ValueError(f"Only 1- or 3-channel models can take image files, this one has {channels} channels.")
    name = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    data = _read_source(source, name)
    width, height = image_header_size(data, name)
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(f"Image {name} is too large: {width}x{height} exceeds the limit of {max_pixels} pixels.")
    shape = (int(size[0]), int(size[1]), int(channels))
    if _png_needs_no_tf(data, shape[:2], channels):
        return _pil_pixels(data, channels, name)
    import tensorflow as tf  # noqa: PLC0415

    try:
        return _decoder(shape)(tf.constant(data)).numpy()
    except tf.errors.InvalidArgumentError as err:
        detail = (err.message or str(err)).strip().splitlines()[0]
        raise ValueError(f"Cannot decode image {name}: {detail}") from err


def list_image_folder(
    root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> tuple[list[Path], list[str]]:
    """Images of ``root/<class>/**/*``: ``(paths, class names)``, sorted; hidden files/folders skipped.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
        ValueError: no image was found.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder not found: {root}")
    extensions = tuple(e.lower() for e in extensions)
    paths: list[Path] = []
    labels: list[str] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
            for filename in sorted(filenames):
                if not filename.startswith(".") and filename.lower().endswith(extensions):
                    paths.append(Path(dirpath) / filename)
                    labels.append(class_dir.name)
    if not paths:
        raise ValueError(f"No images ({', '.join(extensions)}) found in class sub-folders of {root}.")
    return paths, labels


# ---------------------------------------------------------------- embedder
def _available_providers() -> list[str]:
    import onnxruntime as ort  # noqa: PLC0415

    return list(ort.get_available_providers())


def default_providers() -> list[str]:
    """``["CUDAExecutionProvider", "CPUExecutionProvider"]`` with onnxruntime-gpu, else ``["CPUExecutionProvider"]``."""
    available = _available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or available


def _hardware_tag() -> str:
    """A short tag of the CPU (optimized ONNX graphs with NCHWc layouts are hardware specific)."""
    info = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    info += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return hashlib.sha256(info.encode()).hexdigest()[:10]


def _not_onnx_error(path: Path, err: Exception) -> ValueError:
    """A one-line ``ValueError`` for a file onnxruntime cannot load, naming the likely mix-up."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):  # a zip: a .keras archive (or a SavedModel zipped)
        return ValueError(
            f"{path} is a zip archive (a .keras model?), not an ONNX model: export it first with "
            f"scripts/export_onnx.py {path} --output model.onnx, and pass model.onnx."
        )
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ValueError(
        f"{path} is not an ONNX model onnxruntime can load ({detail}); "
        "export one with scripts/export_onnx.py RUN_DIR --output model.onnx."
    )


class Embedder:
    """Batched onnxruntime embeddings of an ONNX file exported by :func:`detreg_keras.export.export_onnx`.

    Args:
        onnx_path: the ONNX model (input ``images`` float32 NHWC, output ``embeddings``).
        providers: onnxruntime execution providers; default CUDA (when
            onnxruntime-gpu is installed) then CPU.
        batch_size: images per ``session.run``.
        intra_op_num_threads: onnxruntime intra-op threads (``None``: one per physical core).
        optimized_model_cache: a folder where the optimised graph is cached
            (keyed by the model file hash, onnxruntime version and CPU), which
            makes later sessions start faster; ``None`` disables the cache.
        graph_optimization_level: ``"all"`` (default), ``"extended"``, ``"basic"`` or ``"disable"``.
        session_config: extra onnxruntime session config entries, e.g.
            ``{"session.intra_op.allow_spinning": "0"}`` (less CPU burnt on a busy machine).

    Attributes:
        image_size: ``(H, W)``; ``channels``; ``embedding_dim``; ``model_hash``
        (from the ONNX metadata, else ``"onnx-sha256:<file hash>"``); ``metadata``
        (the ONNX ``metadata_props``); ``providers`` (those in use).

    Raises:
        FileNotFoundError: ``onnx_path`` does not exist.
        ValueError: the file is not an ONNX model onnxruntime can load (e.g. a
            ``.keras`` archive: the message says to run ``scripts/export_onnx.py``),
            or it is not an NHWC float32 image model; bad ``batch_size`` /
            ``graph_optimization_level``.
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        providers: Sequence[str | tuple[str, dict]] | None = None,
        batch_size: int = 64,
        intra_op_num_threads: int | None = None,
        optimized_model_cache: str | os.PathLike | None = None,
        graph_optimization_level: str = "all",
        session_config: dict[str, str] | None = None,
    ):
        import onnxruntime as ort  # noqa: PLC0415

        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.onnx_path}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = int(batch_size)
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        if graph_optimization_level not in levels:
            raise ValueError(
                f"graph_optimization_level must be one of {sorted(levels)}, got {graph_optimization_level!r}."
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[graph_optimization_level]
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = int(intra_op_num_threads)
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(str(key), str(value))
        providers = list(providers) if providers is not None else default_providers()

        model_file = self.onnx_path
        cache_tmp = cache_path = None
        self._file_hash: str | None = None
        if optimized_model_cache is not None:
            self._file_hash = _file_sha256(self.onnx_path)
            cache_dir = Path(optimized_model_cache)
            cache_dir.mkdir(parents=True, exist_ok=True)
            names = (p if isinstance(p, str) else p[0] for p in providers)
            provider_tag = "-".join(names).replace("ExecutionProvider", "")
            cache_path = cache_dir / (
                f"{self.onnx_path.stem}.{self._file_hash[:16]}.ort{ort.__version__}.{_hardware_tag()}"
                f".{provider_tag}.{graph_optimization_level}.onnx"
            )
            if cache_path.is_file():
                model_file = cache_path
            else:
                cache_tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
                options.optimized_model_filepath = str(cache_tmp)
        self.optimized_model_path = cache_path
        try:
            self.session = ort.InferenceSession(str(model_file), options, providers=providers)
        except Exception as err:  # noqa: BLE001  (a stale or corrupt cache file: rebuild it from the source model)
            if model_file == self.onnx_path:
                raise _not_onnx_error(self.onnx_path, err) from err
            cache_path.unlink(missing_ok=True)
            cache_tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
            options.optimized_model_filepath = str(cache_tmp)
            try:
                self.session = ort.InferenceSession(str(self.onnx_path), options, providers=providers)
            except Exception as source_err:  # noqa: BLE001
                raise _not_onnx_error(self.onnx_path, source_err) from source_err
        if cache_tmp is not None and cache_tmp.exists():
            os.replace(cache_tmp, cache_path)

        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ValueError(f"{self.onnx_path} must have one image input, has {len(inputs)} inputs.")
        self.input_name = inputs[0].name
        self.output_name = "embeddings" if any(o.name == "embeddings" for o in outputs) else outputs[0].name
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        shape = list(inputs[0].shape)
        if len(shape) != 4:
            raise ValueError(f"{self.onnx_path}: expected an NHWC image input of rank 4, got shape {shape}.")
        if inputs[0].type != "tensor(float)":
            raise ValueError(f"{self.onnx_path}: expected a float32 input, got {inputs[0].type}.")

        def dim(value, key):
            if isinstance(value, int) and value > 0:
                return value
            if key in self.metadata:
                return int(self.metadata[key])
            raise ValueError(f"{self.onnx_path}: input dimension {key} is dynamic and not in the metadata.")

        self.image_size = (dim(shape[1], "image_height"), dim(shape[2], "image_width"))
        self.channels = dim(shape[3], "channels")
        out_shape = next(o.shape for o in outputs if o.name == self.output_name)
        last = out_shape[-1] if out_shape else None
        self.embedding_dim = last if isinstance(last, int) else int(self.metadata.get("embedding_dim", 0)) or None
        if "model_hash" in self.metadata:
            self.model_hash = self.metadata["model_hash"]
        else:
            self._file_hash = self._file_hash or _file_sha256(self.onnx_path)
            self.model_hash = f"onnx-sha256:{self._file_hash}"
        self.providers = self.session.get_providers()

    def __repr__(self) -> str:
        return (
            f"Embedder({str(self.onnx_path)!r}, image_size={self.image_size}, channels={self.channels}, "
            f"embedding_dim={self.embedding_dim}, providers={self.providers})"
        )

    # -------------------------------------------------------- validation
    def validate_array(self, images: np.ndarray) -> np.ndarray:
        """Check an NHWC (or HWC) pixel array and return it as float32 ``[B, H, W, C]``.

        Raises:
            ValueError: wrong dtype (not uint8/float), rank (not 3 or 4), channels,
                spatial size, non-finite values or values outside [0, 255].
        """
        array = np.asarray(images)
        if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"Images must be uint8 or float arrays of raw pixels in [0, 255], got dtype {array.dtype}."
            )
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise ValueError(
                f"Images must be NHWC arrays of rank 4 (or one HWC image of rank 3), got rank {array.ndim} "
                f"with shape {array.shape}."
            )
        height, width = self.image_size
        if array.shape[-1] != self.channels:
            raise ValueError(
                f"The model takes {self.channels}-channel NHWC images, got {array.shape[-1]} channels "
                f"(shape {array.shape}); convert to {'RGB' if self.channels == 3 else 'grayscale'} "
                "(channels last)."
            )
        if array.shape[1:3] != (height, width):
            raise ValueError(
                f"The model takes {height}x{width} images, got {array.shape[1]}x{array.shape[2]} "
                f"(shape {array.shape}); resize them (or pass file paths / encoded bytes, which are resized)."
            )
        was_float = array.dtype != np.uint8
        array = array.astype(np.float32, copy=False)
        if was_float and array.size:
            if not np.all(np.isfinite(array)):
                raise ValueError("Images contain NaN or infinite values.")
            low, high = float(array.min()), float(array.max())
            if low < 0.0 or high > 255.0:
                raise ValueError(
                    f"Pixel values must be raw pixels in [0, 255] (preprocessing is inside the model), "
                    f"got values in [{low:.3g}, {high:.3g}]."
                )
            if high <= 1.0 and array.size > 3 * self.channels:
                warnings.warn(
                    "All pixel values are <= 1: the model expects raw pixels in [0, 255], "
                    "not images scaled to [0, 1].",
                    UserWarning,
                    stacklevel=3,
                )
        return np.ascontiguousarray(array)

    def load(self, source) -> np.ndarray:
        """One image (path, encoded bytes or ``[H, W, C]`` array) as float32 ``[H, W, C]``."""
        if isinstance(source, np.ndarray):
            if source.ndim != 3:
                raise ValueError(f"Each image in a list must be an HWC array of rank 3, got shape {source.shape}.")
            return self.validate_array(source)[0]
        if isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
            return load_image(source, self.image_size, self.channels)
        raise ValueError(  # noqa: TRY004  (documented: invalid inputs raise ValueError)
            f"Cannot embed an object of type {type(source).__name__}: pass NHWC arrays, image paths or encoded bytes."
        )

    def _chunks(self, images) -> Iterator[np.ndarray]:
        if isinstance(images, np.ndarray):
            array = self.validate_array(images)
            for start in range(0, len(array), self.batch_size):
                yield array[start : start + self.batch_size]
            return
        if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)):
            images = [images]
        if not isinstance(images, Iterable):
            raise ValueError(f"Cannot embed an object of type {type(images).__name__}.")  # noqa: TRY004
        batch: list[np.ndarray] = []
        for source in images:
            batch.append(self.load(source))
            if len(batch) == self.batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)

    # ---------------------------------------------------------- inference
    def embed(self, images) -> np.ndarray:
        """Embeddings ``float32 [N, D]`` of images.

        Args:
            images: an NHWC ``uint8``/float array of raw pixels in [0, 255] (or one
                HWC image), an image path, encoded bytes, or a sequence of those
                (paths and bytes are decoded to RGB and resized to the model's size).

        Raises:
            ValueError: invalid images (see :meth:`validate_array`, :func:`load_image`).
        """
        outputs = [
            self.session.run([self.output_name], {self.input_name: chunk})[0] for chunk in self._chunks(images)
        ]
        if not outputs:
            return np.zeros((0, self.embedding_dim or 0), np.float32)
        return np.ascontiguousarray(np.concatenate(outputs).astype(np.float32, copy=False))

    __call__ = embed

    def match(self, images, index: EmbeddingIndex, threshold: float | None = None) -> Matches:
        """Embed ``images`` and :meth:`EmbeddingIndex.match` them (label of the top-1 neighbour, or "unknown").

        Raises:
            ValueError: invalid images, an index of another model, or no threshold (see ``EmbeddingIndex.match``).
        """
        if index.model_hash is not None and index.model_hash != self.model_hash:
            raise ValueError(
                f"The index was built with model {index.model_hash!r}, this embedder is model {self.model_hash!r}."
            )
        return index.match(self.embed(images), threshold=threshold)


@dataclasses.dataclass(frozen=True)
class Matches:
    """Result of :meth:`EmbeddingIndex.match`, one entry per query.

    Attributes:
        labels: the top-1 neighbour's label where its cosine is ``>= threshold``, else ``"unknown"``.
        ids: the top-1 neighbour's id (whether matched or not).
        scores: the top-1 cosine similarity (float32; ``-inf`` when an approximate index found none).
        matched: ``scores >= threshold``.
        threshold: the threshold used.
    """

    labels: list
    ids: np.ndarray
    scores: np.ndarray
    matched: np.ndarray
    threshold: float


# ------------------------------------------------------------------- index
_PARAM_ALIASES = {
    "M": "m",
    "efSearch": "ef_search",
    "efsearch": "ef_search",
    "efConstruction": "ef_construction",
    "efconstruction": "ef_construction",
}
_KIND_PARAMS = {
    "flat": set(),
    "ivf": {"nlist", "nprobe", "train_size", "niter"},
    "hnsw": {"m", "ef_search", "ef_construction"},
}


def _as_matrix(x, what: str, dim: int | None = None) -> np.ndarray:
    array = np.asarray(x)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{what} must be a numeric array, got dtype {array.dtype}.")
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [N, D], got shape {array.shape}.")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{what} have dimension {array.shape[1]}, the index has dimension {dim}.")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} contain NaN or infinite values.")
    return array


def _as_column(values, n: int, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype == object:
        if all(isinstance(v, str) for v in array.ravel()):
            array = array.astype(str)
        else:
            raise ValueError(f"{what} must be integers or strings.")
    if array.ndim != 1 or len(array) != n:
        raise ValueError(f"{what} must be a 1-D array of length {n}, got shape {array.shape}.")
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        return array.astype(np.int64)
    if array.dtype.kind == "U":
        return array
    if array.dtype.kind == "S":
        return array.astype(str)
    raise ValueError(f"{what} must be integers or strings, got dtype {array.dtype}.")


def _missing_value(array: np.ndarray):
    return "" if array.dtype.kind == "U" else -1


def _read_index_metadata(directory: Path) -> dict[str, Any]:
    """The parsed ``metadata.json`` of an index folder, checked to be a detreg index this code can read."""
    meta_path = directory / METADATA_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not an index folder (no {METADATA_FILE}).")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path} is not valid JSON ({err}); rebuild the index.") from err
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{meta_path} is not a {INDEX_FORMAT} metadata file.")
    if int(meta.get("format_version", -1)) > INDEX_FORMAT_VERSION:
        raise ValueError(f"{directory} has index format version {meta['format_version']}; this code reads "
                         f"<= {INDEX_FORMAT_VERSION}. Upgrade detreg-keras.")
    return meta


def _index_member(directory: Path, name: Any, role: str) -> Path:
    """``directory / name`` for a file named in the metadata, refusing any path that leaves the folder."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(
            f"{directory / METADATA_FILE}: files.{role} must be a plain file name inside the index folder, "
            f"got {name!r}."
        )
    path = directory / name
    if path.is_symlink() or path.resolve().parent != directory.resolve():
        raise ValueError(f"{directory / METADATA_FILE}: files.{role} {name!r} points outside the index folder.")
    if not path.is_file():
        raise FileNotFoundError(f"Index {directory} lacks its {role} file {name!r}; rebuild the index.")
    return path


def _verify_checksums(directory: Path, meta: dict[str, Any], paths: Sequence[Path]) -> None:
    """Compare each file with the sha256 stored at save time (format 2); warn for format-1 indexes without any."""
    checksums = meta.get("checksums")
    if not checksums:
        warnings.warn(
            f"Index {directory} has no checksums (format version {meta.get('format_version')}): a replaced or "
            "reordered index.faiss / ids.npy cannot be detected. Rebuild it with this version to add them.",
            UserWarning,
            stacklevel=3,
        )
        return
    for path in paths:
        expected = checksums.get(path.name)
        if expected is None:
            raise ValueError(f"{directory / METADATA_FILE} has no checksum for {path.name}; rebuild the index.")
        if _file_sha256(path) != expected:
            raise ValueError(
                f"{path} does not match the checksum in {METADATA_FILE}: the file was modified, replaced or "
                "truncated after the index was saved. Rebuild the index (scripts/detreg_index.py build)."
            )


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npy array (truncated, corrupt or pickled): {err}") from err


class EmbeddingIndex:
    """A faiss index of embeddings with ids and labels (inner product = cosine for unit vectors).

    Example::

        index = EmbeddingIndex(model_hash=embedder.model_hash).build(emb, ids=paths, labels=classes, kind="hnsw")
        ids, labels, scores = index.search(embedder.embed(queries), k=5)
        index.save("index_dir")
        index = EmbeddingIndex.load("index_dir", expected_model_hash=embedder.model_hash)

    Args:
        model_hash: hash of the model that produced the embeddings
            (:attr:`Embedder.model_hash`); ``load`` checks it.
    """

    def __init__(self, model_hash: str | None = None):
        self.model_hash = model_hash
        self.index = None
        self.kind: str | None = None
        self.params: dict[str, int] = {}
        self.ids: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.extra: dict[str, Any] = {}
        self.threshold: float | None = None
        self.calibration: dict[str, Any] | None = None

    # ---------------------------------------------------------- properties
    @property
    def dimension(self) -> int | None:
        return None if self.index is None else int(self.index.d)

    @property
    def count(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (
            f"EmbeddingIndex(kind={self.kind!r}, count={self.count}, dimension={self.dimension}, "
            f"params={self.params})"
        )

    # --------------------------------------------------------------- build
    @staticmethod
    def _normalise_params(kind: str, params: dict[str, Any]) -> dict[str, int]:
        out = {}
        for key, value in params.items():
            if value is None:
                continue
            key = _PARAM_ALIASES.get(key, key)
            if key not in _KIND_PARAMS[kind]:
                raise ValueError(f"Unknown parameter {key!r} for kind={kind!r}; expected {sorted(_KIND_PARAMS[kind])}.")
            if int(value) < 1:
                raise ValueError(f"{key} must be >= 1, got {value}.")
            out[key] = int(value)
        return out

    def build(
        self,
        embeddings: np.ndarray,
        ids: Sequence | np.ndarray | None = None,
        labels: Sequence | np.ndarray | None = None,
        kind: str = "flat",
        **params,
    ) -> EmbeddingIndex:
        """Index ``embeddings [N, D]`` (replacing any previous content); returns ``self``.

        Args:
            embeddings: float array ``[N, D]`` (unit vectors for cosine similarity).
            ids: one id per row, integers or strings (unique); default ``0..N-1``.
            labels: optional label per row, integers or strings (e.g. class names).
            kind: ``"flat"`` (exact, ``IndexFlatIP``), ``"ivf"`` (IVF-Flat) or ``"hnsw"``.
            **params: for ``"ivf"``: ``nlist`` (default ``≈4·sqrt(N)``, at most
                ``N // 39``), ``nprobe`` (default ``max(1, nlist // 16)``), ``train_size``
                (k-means training sample, default ``min(N, 50·nlist)``, seeded) and
                ``niter`` (k-means iterations, 10 as in faiss); for ``"hnsw"``: ``M``/``m`` (32),
                ``ef_search``/``efSearch`` (128) and ``ef_construction``/``efConstruction`` (40).

        Raises:
            ValueError: bad shapes, non-finite values, duplicate ids, unknown kind/params,
                or fewer embeddings than IVF lists.
        """
        import faiss  # noqa: PLC0415

        kind = str(kind).lower()
        if kind not in INDEX_KINDS:
            raise ValueError(f"Unknown index kind {kind!r}; expected one of {INDEX_KINDS}.")
        x = _as_matrix(embeddings, "Embeddings")
        n, dim = x.shape
        if n == 0:
            raise ValueError("Cannot build an index from 0 embeddings.")
        ids_arr = np.arange(n, dtype=np.int64) if ids is None else _as_column(ids, n, "ids")
        if len(np.unique(ids_arr)) != n:
            raise ValueError("ids must be unique.")
        labels_arr = None if labels is None else _as_column(labels, n, "labels")
        params = self._normalise_params(kind, params)

        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            nlist = params.setdefault("nlist", max(1, min(round(4 * np.sqrt(n)), n // 39)))
            if nlist > n:
                raise ValueError(f"kind='ivf' needs at least nlist={nlist} embeddings to train, got {n}.")
            params.setdefault("nprobe", max(1, nlist // 16))
            train_size = min(n, params.setdefault("train_size", min(n, 50 * nlist)))
            if train_size < nlist:
                raise ValueError(f"train_size={train_size} must be >= nlist={nlist}.")
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.niter = params.setdefault("niter", 10)
            index.cp.max_points_per_centroid = max(1, -(-train_size // nlist))
            sample = x if train_size >= n else x[np.sort(np.random.default_rng(0).choice(n, train_size, replace=False))]
            index.train(sample)
            index.nprobe = params["nprobe"]
        else:
            params.setdefault("m", 32)
            params.setdefault("ef_construction", 40)
            params.setdefault("ef_search", 128)
            index = faiss.IndexHNSWFlat(dim, params["m"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = params["ef_construction"]
            index.hnsw.efSearch = params["ef_search"]
        index.add(x)
        self.index, self.kind, self.params = index, kind, params
        self.ids, self.labels = ids_arr, labels_arr
        return self

    def add(self, embeddings: np.ndarray, ids=None, labels=None) -> EmbeddingIndex:
        """Append embeddings to a built index (ids default to ``max(ids) + 1, ...`` for integer ids)."""
        if self.index is None:
            raise ValueError("Build the index before adding to it.")
        x = _as_matrix(embeddings, "Embeddings", self.dimension)
        n = len(x)
        if ids is None:
            if self.ids.dtype.kind == "U":
                raise ValueError("This index has string ids: pass ids= to add().")
            start = int(self.ids.max()) + 1 if len(self.ids) else 0
            new_ids = np.arange(start, start + n, dtype=np.int64)
        else:
            new_ids = _as_column(ids, n, "ids")
        if new_ids.dtype.kind != self.ids.dtype.kind:
            raise ValueError(f"ids must have the same type as the index's ids ({self.ids.dtype}), got {new_ids.dtype}.")
        if len(np.unique(np.concatenate([self.ids, new_ids]))) != len(self.ids) + n:
            raise ValueError("ids must be unique (some new ids are duplicated or already in the index).")
        if (labels is None) != (self.labels is None):
            raise ValueError("Pass labels to add() exactly when the index has labels.")
        new_labels = None if labels is None else _as_column(labels, n, "labels")
        if new_labels is not None and new_labels.dtype.kind != self.labels.dtype.kind:
            raise ValueError(f"labels must have the same type as the index's labels ({self.labels.dtype}).")
        self.index.add(x)
        self.ids = np.concatenate([self.ids, new_ids])
        if new_labels is not None:
            self.labels = np.concatenate([self.labels, new_labels])
        return self

    # -------------------------------------------------------------- search
    def search(
        self, queries: np.ndarray, k: int = 10, nprobe: int | None = None, ef_search: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """The ``k`` most similar indexed items of each query.

        Args:
            queries: ``[Q, D]`` (or one ``[D]`` vector).
            k: neighbours per query (at most the index size).
            nprobe: IVF lists probed (overrides the index default for this call).
            ef_search: HNSW search breadth (overrides the default for this call).

        Returns:
            ``(ids [Q, k], labels [Q, k] or None, scores [Q, k] float32)``, best
            first. Slots an approximate index could not fill hold id/label ``-1``
            (``""`` for string ids/labels) and score ``-inf``.

        Raises:
            ValueError: empty index, bad query shape/dimension or ``k < 1``.
        """
        import faiss  # noqa: PLC0415

        if self.index is None or self.count == 0:
            raise ValueError("The index is empty: build() or load() it first.")
        q = _as_matrix(queries, "Queries", self.dimension)
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        k = min(int(k), self.count)
        search_params = None
        if self.kind == "ivf":
            search_params = faiss.SearchParametersIVF(nprobe=int(nprobe or self.params["nprobe"]))
        elif self.kind == "hnsw":
            search_params = faiss.SearchParametersHNSW(efSearch=max(int(ef_search or self.params["ef_search"]), k))
        elif nprobe is not None or ef_search is not None:
            raise ValueError("nprobe applies to kind='ivf' and ef_search to kind='hnsw' only.")
        scores, positions = self.index.search(q, k, params=search_params)
        missing = positions < 0
        safe = np.where(missing, 0, positions)
        ids = self.ids[safe]
        labels = None if self.labels is None else self.labels[safe]
        if missing.any():
            ids = np.where(missing, _missing_value(self.ids), ids)
            if labels is not None:
                labels = np.where(missing, _missing_value(self.labels), labels)
            scores = np.where(missing, -np.inf, scores)
        return ids, labels, scores.astype(np.float32, copy=False)

    # --------------------------------------------------------- verification
    def set_threshold(self, threshold) -> EmbeddingIndex:
        """Set (or with ``None`` clear) the cosine threshold :meth:`match` uses; saved in ``metadata.json``.

        Args:
            threshold: a float in ``[-1, 1]``, a :class:`~detreg_keras.verification.Calibration`
                (its threshold and rates are stored) or ``None``.

        Raises:
            ValueError: a threshold outside ``[-1, 1]`` or not a number.
        """
        from detreg_keras.verification import Calibration, check_threshold  # noqa: PLC0415

        if threshold is None:
            self.threshold, self.calibration = None, None
        elif isinstance(threshold, Calibration):
            self.threshold, self.calibration = check_threshold(threshold.threshold), threshold.to_dict()
        else:
            self.threshold, self.calibration = check_threshold(threshold), None
        return self

    def calibrate(
        self,
        embeddings: np.ndarray,
        labels: Sequence | np.ndarray,
        target_fmr: float | None = None,
        target_precision: float | None = None,
        max_genuine: int | None = None,
        max_impostor: int | None = None,
        seed: int = 0,
    ):
        """Calibrate the threshold on held-out labelled embeddings (not the indexed ones) and set it.

        The pairs of ``embeddings`` are scored by cosine; the threshold is
        :func:`~detreg_keras.verification.calibrate_threshold`'s for the target.
        It is a *pair* threshold: :meth:`match` compares it with the top-1
        neighbour's cosine, whose false-match rate grows with the index size.

        Returns:
            The :class:`~detreg_keras.verification.Calibration` (also stored in ``metadata.json``).

        Raises:
            ValueError: pairs of one kind only (one label, or no label with two items), bad targets.
        """
        from detreg_keras.verification import calibrate_threshold, verification_pairs  # noqa: PLC0415

        pairs = verification_pairs(embeddings, labels, max_genuine=max_genuine, max_impostor=max_impostor, seed=seed)
        calibration = calibrate_threshold(
            pairs.scores, pairs.genuine, target_fmr=target_fmr, target_precision=target_precision
        )
        self.set_threshold(calibration)
        return calibration

    def match(
        self,
        queries: np.ndarray,
        threshold: float | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> Matches:
        """The label of each query's nearest indexed item if its cosine is ``>= threshold``, else ``"unknown"``.

        Args:
            queries: ``[Q, D]`` embeddings (or one ``[D]`` vector).
            threshold: cosine threshold in ``[-1, 1]``; ``None``: the index's
                (:meth:`set_threshold` / :meth:`calibrate`, saved with the index).
            nprobe, ef_search: as in :meth:`search`.

        Raises:
            ValueError: the index has no labels, no threshold is set or given, a
                threshold outside ``[-1, 1]``, or bad queries.
        """
        from detreg_keras.verification import UNKNOWN, check_threshold  # noqa: PLC0415

        if threshold is None:
            if self.threshold is None:
                raise ValueError(
                    "No match threshold: pass threshold=, or set one with calibrate() / set_threshold() "
                    "(saved with the index)."
                )
            threshold = self.threshold
        threshold = check_threshold(threshold)
        if self.index is not None and self.labels is None:
            raise ValueError("match() returns labels, but this index has none: build it with labels=.")
        ids, labels, scores = self.search(queries, k=1, nprobe=nprobe, ef_search=ef_search)
        scores = scores[:, 0]
        matched = scores >= threshold
        out = [labels[q, 0].item() if matched[q] else UNKNOWN for q in range(len(scores))]
        return Matches(out, ids[:, 0], scores, matched, threshold)

    # ------------------------------------------------------------ save/load
    def metadata(self, checksums: dict[str, str] | None = None) -> dict[str, Any]:
        """The ``metadata.json`` content; ``checksums`` maps each written file name to its sha256."""
        import faiss  # noqa: PLC0415

        return {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "dimension": self.dimension,
            "kind": self.kind,
            "params": dict(self.params),
            "metric": "inner_product",
            "model_hash": self.model_hash,
            "count": self.count,
            "ids_dtype": None if self.ids is None else self.ids.dtype.str,
            "labels_dtype": None if self.labels is None else self.labels.dtype.str,
            "detreg_version": _detreg_version(),
            "faiss_version": faiss.__version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": {"index": INDEX_FILE, "ids": IDS_FILE, "labels": LABELS_FILE if self.labels is not None else None},
            "checksums": dict(checksums or {}),
            "extra": self.extra,
            "verification": None
            if self.threshold is None
            else {"threshold": self.threshold, "rule": "score >= threshold", "calibration": self.calibration},
        }

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``index.faiss`` (faiss ``write_index``), ``ids.npy``, ``labels.npy`` and ``metadata.json``.

        The folder is written next to its final place and renamed when complete.

        Raises:
            FileExistsError: ``directory`` exists and is not empty, and ``overwrite`` is False.
            ValueError: the index is empty.
        """
        import faiss  # noqa: PLC0415

        if self.index is None:
            raise ValueError("Nothing to save: build() the index first.")
        directory = Path(directory)
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
            raise FileExistsError(f"{directory} exists and is not empty; pass overwrite=True (CLI: --overwrite).")
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            os.chmod(tmp, 0o755)
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            np.save(tmp / IDS_FILE, self.ids, allow_pickle=False)
            if self.labels is not None:
                np.save(tmp / LABELS_FILE, self.labels, allow_pickle=False)
            checksums = {f.name: _file_sha256(f) for f in sorted(tmp.iterdir())}
            (tmp / METADATA_FILE).write_text(json.dumps(self.metadata(checksums), indent=2, sort_keys=True))
            if directory.exists():
                if directory.is_dir():
                    shutil.rmtree(directory)
                else:
                    directory.unlink()
            os.rename(tmp, directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return directory

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        expected_model_hash: str | None = None,
        expected_dimension: int | None = None,
    ) -> EmbeddingIndex:
        """Load an index written by :meth:`save` (no pickle: faiss ``read_index``, ``.npy``, JSON).

        Args:
            directory: the index folder.
            expected_model_hash: refuse the index unless it was built from this
                model's embeddings (:attr:`Embedder.model_hash`); without it the
                index loads with a ``UserWarning`` (nothing ties it to the query model).
            expected_dimension: refuse the index unless it has this dimension.

        Every file is checked against the sha256 stored in ``metadata.json`` at
        save time (a replaced, reordered or truncated ``index.faiss`` /
        ``ids.npy`` / ``labels.npy`` is refused); format-1 indexes, written
        before checksums existed, load with a ``UserWarning``. File names in the
        metadata must be plain names inside ``directory``.

        Raises:
            FileNotFoundError: missing folder or files.
            ValueError: not a detreg index, a checksum mismatch, unreadable or
                inconsistent files, a file outside the folder, model hash or dimension mismatch.
        """
        import faiss  # noqa: PLC0415

        directory = Path(directory)
        meta = _read_index_metadata(directory)
        stored_hash = meta.get("model_hash")
        if expected_model_hash is None:
            warnings.warn(
                f"EmbeddingIndex.load({str(directory)!r}) without expected_model_hash: the index (model "
                f"{stored_hash!r}) is not checked against the model that embeds the queries, and an index of "
                "another model returns meaningless neighbours. Pass expected_model_hash=embedder.model_hash.",
                UserWarning,
                stacklevel=2,
            )
        elif stored_hash != expected_model_hash:
            raise ValueError(
                f"Index {directory} was built with embeddings of model {stored_hash!r}, not of the model in use "
                f"({expected_model_hash!r}); its similarities would be meaningless. Rebuild the index with this model."
            )
        dimension = int(meta["dimension"])
        if expected_dimension is not None and dimension != int(expected_dimension):
            raise ValueError(
                f"Index {directory} has dimension {dimension}, expected {expected_dimension} (embedding dimension)."
            )
        kind = meta.get("kind")
        if kind not in INDEX_KINDS:
            raise ValueError(f"{directory / METADATA_FILE}: unknown index kind {kind!r}.")
        files = meta.get("files") or {}
        index_path = _index_member(directory, files.get("index", INDEX_FILE), "index")
        ids_path = _index_member(directory, files.get("ids", IDS_FILE), "ids")
        labels_path = _index_member(directory, files["labels"], "labels") if files.get("labels") else None
        _verify_checksums(directory, meta, [p for p in (index_path, ids_path, labels_path) if p is not None])
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as err:
            detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise ValueError(f"{index_path} is not a readable faiss index (truncated or corrupt?): {detail}") from err
        ids = _load_array(ids_path)
        labels = _load_array(labels_path) if labels_path is not None else None
        count = int(meta["count"])
        if int(index.d) != dimension:
            raise ValueError(f"{directory}: faiss index dimension {index.d} != metadata dimension {dimension}.")
        if int(index.ntotal) != count or len(ids) != count or (labels is not None and len(labels) != count):
            raise ValueError(
                f"{directory}: inconsistent sizes (faiss {index.ntotal}, ids {len(ids)}, "
                f"labels {None if labels is None else len(labels)}, metadata {count})."
            )
        out = cls(model_hash=stored_hash)
        out.index, out.kind, out.ids, out.labels = index, kind, ids, labels
        out.params = {k: int(v) for k, v in (meta.get("params") or {}).items()}
        out.extra = dict(meta.get("extra") or {})
        _load_verification(out, meta.get("verification"), directory)
        return out


def _load_verification(index: EmbeddingIndex, stored: Any, directory: Path) -> None:
    """Restore the match threshold saved in ``metadata.json`` (absent in indexes saved before it existed)."""
    if stored is None:
        return
    if not isinstance(stored, dict) or "threshold" not in stored:
        raise ValueError(f"{directory / METADATA_FILE}: 'verification' must be an object with a 'threshold'.")
    try:
        index.set_threshold(stored["threshold"])
    except ValueError as err:
        raise ValueError(f"{directory / METADATA_FILE}: {err}") from err
    calibration = stored.get("calibration")
    index.calibration = dict(calibration) if isinstance(calibration, dict) else None


def recall_against_exact(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of the exact top-k found by an approximate search (recall@k of the index)."""
    approx_ids, exact_ids = np.asarray(approx_ids), np.asarray(exact_ids)
    if approx_ids.shape != exact_ids.shape:
        raise ValueError(f"Shapes differ: {approx_ids.shape} vs {exact_ids.shape}.")
    hits = sum(len(np.intersect1d(a, e)) for a, e in zip(approx_ids, exact_ids))
    return hits / exact_ids.size if exact_ids.size else 1.0


__all__ = [
    "IMAGE_EXTENSIONS",
    "INDEX_KINDS",
    "Embedder",
    "EmbeddingIndex",
    "Matches",
    "default_providers",
    "list_image_folder",
    "load_image",
    "recall_against_exact",
]
