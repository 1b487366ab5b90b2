"""Batched onnxruntime embeddings of an ONNX model exported by :func:`detreg_keras.export.export_onnx`.

:class:`Embedder` runs the ONNX file with onnxruntime (CUDA when the
``onnxruntime-gpu`` build is installed, else CPU; all graph optimisations on) in
batches. It takes NHWC ``uint8``/float arrays of raw pixels or image files /
encoded bytes (decoded by :func:`detreg_runtime.imaging.load_image`, the same
pixels as training and the SavedModel) and returns float32 L2-normalised
embeddings. No TensorFlow: numpy, PIL, simplejpeg and onnxruntime only.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from detreg_runtime.imaging import load_image
from detreg_runtime.index import EmbeddingIndex, Matches, file_sha256


def import_onnxruntime():
    """The ``onnxruntime`` module, or an ImportError that says which extra installs it.

    The base install carries no onnxruntime build (one build per environment:
    ``pip install "detreg-keras[cpu]"`` or ``"detreg-keras[gpu]"``, never both).
    """
    try:
        import onnxruntime  # noqa: PLC0415
    except ImportError as error:
        raise ImportError(
            "onnxruntime is not installed: pip install -e \".[cpu]\" (CPU build) or -e \".[gpu]\" "
            "(CUDA build, instead of the CPU one; never both)."
        ) from error
    return onnxruntime


def _available_providers() -> list[str]:
    return list(import_onnxruntime().get_available_providers())


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


def _session_options(level: str, intra_op_num_threads: int | None, config: dict[str, str] | None):
    """onnxruntime ``SessionOptions``: the optimisation ``level``, sequential, one inter-op thread, ``config`` entries.

    Raises:
        ValueError: an unknown ``level``.
    """
    ort = import_onnxruntime()

    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    if level not in levels:
        raise ValueError(f"graph_optimization_level must be one of {sorted(levels)}, got {level!r}.")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if intra_op_num_threads is not None:
        options.intra_op_num_threads = int(intra_op_num_threads)
    for key, value in (config or {}).items():
        options.add_session_config_entry(str(key), str(value))
    return options


#: ONNX metadata key of a stored verification threshold (written by ``detreg_keras.export.threshold_metadata``).
THRESHOLD_METADATA_KEY = "verification_threshold"


def _metadata_threshold(metadata: dict[str, str], path: Path) -> float | None:
    """The verification threshold stored in the ONNX metadata, or ``None``.

    Raises:
        ValueError: the stored value is not a number in ``[-1, 1]``.
    """
    if THRESHOLD_METADATA_KEY not in metadata:
        return None
    from detreg_runtime.verification import check_threshold  # noqa: PLC0415

    raw = metadata[THRESHOLD_METADATA_KEY]
    try:
        return check_threshold(float(raw))
    except ValueError as err:
        raise ValueError(f"{path}: metadata {THRESHOLD_METADATA_KEY}={raw!r} is not a cosine in [-1, 1].") from err


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
        (the ONNX ``metadata_props``); ``providers`` (those in use); ``threshold``
        (the verification threshold stored at export, ``--threshold``, else ``None``).

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
        ort = import_onnxruntime()

        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.onnx_path}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.batch_size = int(batch_size)
        options = _session_options(graph_optimization_level, intra_op_num_threads, session_config)
        providers = list(providers) if providers is not None else default_providers()

        model_file = self.onnx_path
        cache_tmp = cache_path = None
        self._file_hash: str | None = None
        if optimized_model_cache is not None:
            self._file_hash = file_sha256(self.onnx_path)
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
        except Exception as err:
            if model_file == self.onnx_path:
                raise _not_onnx_error(self.onnx_path, err) from err
            cache_path.unlink(missing_ok=True)
            cache_tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
            options.optimized_model_filepath = str(cache_tmp)
            try:
                self.session = ort.InferenceSession(str(self.onnx_path), options, providers=providers)
            except Exception as source_err:
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
            self._file_hash = self._file_hash or file_sha256(self.onnx_path)
            self.model_hash = f"onnx-sha256:{self._file_hash}"
        self.providers = self.session.get_providers()
        self.threshold = _metadata_threshold(self.metadata, self.onnx_path)

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
        raise ValueError(
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
            raise ValueError(f"Cannot embed an object of type {type(images).__name__}.")
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

        The threshold is ``threshold`` if given, else the index's, else the one
        stored in the ONNX metadata (:attr:`threshold`).

        Raises:
            ValueError: invalid images, an index of another model, or no threshold (see ``EmbeddingIndex.match``).
        """
        if index.model_hash is not None and index.model_hash != self.model_hash:
            raise ValueError(
                f"The index was built with model {index.model_hash!r}, this embedder is model {self.model_hash!r}."
            )
        if threshold is None and index.threshold is None:
            threshold = self.threshold
        return index.match(self.embed(images), threshold=threshold)


__all__ = ["THRESHOLD_METADATA_KEY", "Embedder", "default_providers"]
