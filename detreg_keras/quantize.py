"""Opt-in int8 quantization of an exported ONNX embedding model, with a recall guard.

:func:`quantize_onnx` turns the fp32 file written by
:func:`detreg_keras.export.export_onnx` into a second, int8 file (onnxruntime
static quantization: ``quant_pre_process``, then ``quantize_static`` in the
QDQ format, int8 activations and per-channel int8 weights, MinMax ranges from
calibration images). It never replaces the fp32 file nor any existing file, and
it publishes the int8 file only after measuring, on a held-out labelled split:

* the embedding error against the fp32 model run by onnxruntime
  (``max |e_int8 - e_fp32|`` and the smallest cosine between the two);
* Recall@1 and MAP@R of both (:func:`detreg_keras.metrics.evaluate_embeddings`,
  each split searched against itself);
* the median latency of both (interleaved repetitions, ratio fp32 / int8).

If Recall@1 drops by more than ``max_r1_drop`` points (default 0.2, i.e.
0.2 % of the queries), nothing is written and :class:`QuantizationError` gives
the measured numbers. The int8 file carries the fp32 file's metadata, with
``model_hash`` suffixed ``+int8`` (an index built from fp32 embeddings is
refused by an int8 :class:`~detreg_runtime.embedder.Embedder`: rebuild it with
the int8 model), ``source_model_hash`` and the measured numbers.
fp16 is not offered: it needs ``onnxconverter-common`` and gives no speed-up on
CPUs without fp16 arithmetic.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from detreg_runtime.embedder import import_onnxruntime

#: Default largest allowed Recall@1 drop, in points (percent of queries).
DEFAULT_MAX_R1_DROP = 0.2
QUANTIZATION_NOTE = "int8 static QDQ (onnxruntime.quantization.quantize_static, MinMax, per-channel weights)"


class QuantizationError(RuntimeError):
    """The quantized model loses more Recall@1 than the tolerance allows; nothing was written."""


@dataclass(frozen=True)
class QuantizationReport:
    """What :func:`quantize_onnx` measured (and wrote, when ``path`` is set).

    Attributes:
        path: the int8 ONNX file written.
        fp32_path: its fp32 source.
        max_abs_diff: ``max |e_int8 - e_fp32|`` over the evaluation images.
        min_cosine: smallest cosine between an int8 embedding and its fp32 twin.
        mean_cosine: mean of those cosines.
        r1_fp32, r1_int8: Recall@1 (in [0, 1]) of each on the evaluation split.
        map_r_fp32, map_r_int8: MAP@R of each.
        r1_drop_points: ``100 * (r1_fp32 - r1_int8)``.
        max_r1_drop: the tolerance, in points.
        latency_ms: ``{batch: {"fp32": median ms, "int8": median ms}}``.
        speedup: ``{batch: fp32 median / int8 median}``.
        num_calibration, num_eval: image counts.
        size_mb: ``{"fp32": MiB, "int8": MiB}``.
    """

    path: Path
    fp32_path: Path
    max_abs_diff: float
    min_cosine: float
    mean_cosine: float
    r1_fp32: float
    r1_int8: float
    map_r_fp32: float
    map_r_int8: float
    r1_drop_points: float
    max_r1_drop: float
    latency_ms: dict[int, dict[str, float]]
    speedup: dict[int, float]
    num_calibration: int
    num_eval: int
    size_mb: dict[str, float]

    def to_dict(self) -> dict:
        """JSON-ready dict (paths as strings)."""
        out = asdict(self)
        out["path"], out["fp32_path"] = str(self.path), str(self.fp32_path)
        return out

    def summary(self) -> str:
        """A few human-readable lines: error, recall change, speed-up."""
        lines = [
            (
                f"int8 vs fp32 (onnxruntime) on {self.num_eval} images: max |diff| {self.max_abs_diff:.3g}, "
                f"min cosine {self.min_cosine:.5f}"
            ),
            (
                f"Recall@1 {100 * self.r1_fp32:.2f} -> {100 * self.r1_int8:.2f} "
                f"(drop {self.r1_drop_points:+.2f} points, tolerance {self.max_r1_drop:g}); "
                f"MAP@R {100 * self.map_r_fp32:.2f} -> {100 * self.map_r_int8:.2f}"
            ),
        ]
        lines += [
            f"batch {b}: fp32 {t['fp32']:.2f} ms, int8 {t['int8']:.2f} ms ({self.speedup[b]:.2f}x)"
            for b, t in self.latency_ms.items()
        ]
        return "\n".join(lines)


# ------------------------------------------------------------------ inputs
def _check_images(images, what: str, shape: tuple[int, int, int]) -> np.ndarray:
    """``images`` as a float32 NHWC array of raw pixels matching the model's ``shape``.

    Raises:
        ValueError: missing/empty, wrong rank or size, or values outside [0, 255].
    """
    if images is None or len(images) == 0:
        raise ValueError(
            f"int8 static quantization needs {what} images (a non-empty float32/uint8 NHWC array of raw "
            f"pixels, e.g. a few hundred training images; CLI: --calibration-dir); got "
            f"{'none' if images is None else 'an empty array'}."
        )
    array = np.asarray(images)
    if array.ndim != 4 or tuple(array.shape[1:]) != tuple(shape):
        raise ValueError(f"The {what} images must have shape [N, {', '.join(map(str, shape))}], got {array.shape}.")
    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 255.0:
        raise ValueError(f"The {what} images must be raw pixels in [0, 255] (finite).")
    return np.ascontiguousarray(array)


def _check_output(fp32_path: Path, out_path: Path) -> None:
    if not fp32_path.is_file():
        raise FileNotFoundError(f"No such ONNX model: {fp32_path}")
    if out_path.resolve() == fp32_path.resolve():
        raise ValueError(f"The quantized file must not replace the fp32 model {fp32_path}; choose another path.")
    if out_path.exists():
        raise FileExistsError(f"{out_path} already exists; a quantized model never overwrites a file.")


def default_quantized_path(fp32_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.int8.onnx`` (beside the fp32 file)."""
    path = Path(fp32_path)
    return path.with_name(f"{path.stem}.int8{path.suffix or '.onnx'}")


# ------------------------------------------------------------ onnxruntime
def _session(path: Path, threads: int | None = None):
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _input_shape(session) -> tuple[int, int, int]:
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise ValueError(f"Expected an NHWC image model with a fixed image size, the input has shape {shape}.")
    return tuple(int(d) for d in shape[1:])


def onnx_image_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(H, W, C)`` the ONNX image model at ``path`` takes.

    Raises:
        ValueError: the input is not NHWC with a fixed image size.
    """
    return _input_shape(_session(Path(path)))


def _embed(session, images: np.ndarray, batch: int = 64) -> np.ndarray:
    name = session.get_inputs()[0].name
    chunks = [session.run(["embeddings"], {name: images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    return np.concatenate(chunks).astype(np.float32, copy=False)


class _CalibrationReader:
    """onnxruntime ``CalibrationDataReader``: the calibration images in batches."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int):
        self._batches: Iterator[np.ndarray] = (images[i : i + batch] for i in range(0, len(images), batch))
        self._name = input_name

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._name: batch}


def _quantize_to(fp32_path: Path, target: Path, calibration: np.ndarray, batch: int, per_channel: bool) -> None:
    """Pre-process and statically quantize ``fp32_path`` (int8 QDQ) into ``target``."""
    from onnxruntime.quantization import (  # noqa: PLC0415
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    prepared = target.with_name(target.name + ".prep.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        name = _session(prepared).get_inputs()[0].name
        quantize_static(
            str(prepared), str(target), _CalibrationReader(name, calibration, batch),
            quant_format=QuantFormat.QDQ, per_channel=per_channel, activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )  # fmt: skip
    finally:
        prepared.unlink(missing_ok=True)
        for leftover in target.parent.glob(target.name + ".prep*"):
            leftover.unlink(missing_ok=True)


# -------------------------------------------------------------- measuring
def embedding_agreement(reference: np.ndarray, other: np.ndarray) -> tuple[float, float, float]:
    """``(max |other - reference|, min cosine, mean cosine)`` between paired embedding rows."""
    diff = float(np.max(np.abs(other - reference)))
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1)
    cosine = np.sum(reference * other, axis=1) / np.maximum(norms, 1e-12)
    return diff, float(np.min(cosine)), float(np.mean(cosine))


def _retrieval(embeddings: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    from detreg_keras.metrics import evaluate_embeddings  # noqa: PLC0415

    result = evaluate_embeddings(embeddings, labels, ks=(1,), metrics=("recall", "map@r"), use_gpu=False)
    return result["recall@1"], result["map@r"]


def paired_latency(sessions: dict[str, object], images: np.ndarray, reps: int) -> dict[str, float]:
    """Median ms per ``session.run`` of each session on ``images``; order rotated each repetition."""
    names = list(sessions)
    feeds = {n: {sessions[n].get_inputs()[0].name: images} for n in names}
    for name in names:  # warm-up
        sessions[name].run(["embeddings"], feeds[name])
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(max(1, int(reps))):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            sessions[name].run(["embeddings"], feeds[name])
            times[name].append(time.perf_counter() - start)
    return {n: float(np.median(t)) * 1e3 for n, t in times.items()}


def _write_metadata(path: Path, fp32_path: Path, report_meta: dict[str, str]) -> None:
    """Copy the fp32 metadata into the int8 file, hash suffixed ``+int8``, plus ``report_meta``."""
    import onnx  # noqa: PLC0415

    source = {p.key: p.value for p in onnx.load(str(fp32_path), load_external_data=False).metadata_props}
    proto = onnx.load(str(path))
    meta = dict(source)
    if "model_hash" in source:
        meta["source_model_hash"] = source["model_hash"]
        meta["model_hash"] = source["model_hash"] + "+int8"
    meta.update(report_meta)
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(proto, str(path))


def _publish(tmp: Path, out_path: Path) -> None:
    """Hard-link ``tmp`` to ``out_path`` (fails if it exists); fall back to a checked rename."""
    try:
        os.link(tmp, out_path)
    except FileExistsError:
        raise FileExistsError(f"{out_path} appeared during quantization; not overwriting it.") from None
    except OSError:  # no hard links on this file system
        if out_path.exists():
            raise FileExistsError(f"{out_path} appeared during quantization; not overwriting it.") from None
        os.replace(tmp, out_path)


def load_folder_images(
    root: str | os.PathLike, shape: tuple[int, int, int], limit: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Images of a class-per-folder tree as ``(float32 [N, H, W, C], [N] class names)``.

    Decoded and resized like the Embedder (:func:`detreg_runtime.imaging.load_image`).
    With ``limit``, a seeded random subset of that many images.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
        ValueError: no image in its class sub-folders.
    """
    from detreg_runtime.imaging import list_image_folder, load_image  # noqa: PLC0415

    paths, labels = list_image_folder(root)
    order = np.arange(len(paths))
    if limit is not None and limit < len(paths):
        order = np.sort(np.random.default_rng(seed).choice(len(paths), int(limit), replace=False))
    images = np.stack([load_image(paths[i], shape[:2], shape[2]) for i in order])
    return images, np.asarray(labels)[order]


# -------------------------------------------------------------------- API
def quantize_onnx(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike | None,
    calibration_images: np.ndarray | None,
    eval_images: np.ndarray,
    eval_labels: Sequence | np.ndarray,
    max_r1_drop: float = DEFAULT_MAX_R1_DROP,
    *,
    per_channel: bool = True,
    calibration_batch: int = 16,
    latency_batch_sizes: Sequence[int] = (1, 32),
    latency_reps: int = 10,
    intra_op_num_threads: int | None = None,
) -> QuantizationReport:
    """Write an int8 copy of an exported fp32 ONNX model if its Recall@1 stays within ``max_r1_drop`` points.

    Args:
        fp32_path: the ONNX file of :func:`detreg_keras.export.export_onnx` (left untouched).
        out_path: the int8 file to create (``None``: :func:`default_quantized_path`,
            ``model.int8.onnx``); it must not exist.
        calibration_images: float32/uint8 ``[N, H, W, C]`` raw pixels in [0, 255]
            whose activation ranges set the int8 scales (training images, not the evaluation split).
        eval_images: held-out labelled images ``[M, H, W, C]`` for the error and recall measurement.
        eval_labels: their ``[M]`` class labels (each class at least twice).
        max_r1_drop: largest allowed ``100 * (R@1 fp32 - R@1 int8)``, in points (>= 0).
        per_channel: per-output-channel weight scales (more accurate, default).
        calibration_batch: images per calibration run.
        latency_batch_sizes: batch sizes timed (fp32 vs int8, interleaved).
        latency_reps: timed repetitions per batch size.
        intra_op_num_threads: onnxruntime threads for the timing (``None``: one per core).

    Returns:
        :class:`QuantizationReport` (``path`` is the written file).

    Raises:
        ValueError: no or malformed calibration / evaluation images, a negative
            tolerance, or ``out_path`` is the fp32 file.
        FileNotFoundError: ``fp32_path`` does not exist.
        FileExistsError: ``out_path`` exists (it is never overwritten).
        QuantizationError: Recall@1 drops by more than ``max_r1_drop`` points
            (the message gives both recalls); nothing is written.
    """
    fp32_path = Path(fp32_path)
    out_path = Path(out_path) if out_path is not None else default_quantized_path(fp32_path)
    _check_output(fp32_path, out_path)
    if not np.isfinite(max_r1_drop) or max_r1_drop < 0:
        raise ValueError(f"max_r1_drop is a tolerance in Recall@1 points and must be >= 0, got {max_r1_drop!r}.")
    fp32 = _session(fp32_path, intra_op_num_threads)
    shape = _input_shape(fp32)
    calibration = _check_images(calibration_images, "calibration", shape)
    evaluation = _check_images(eval_images, "evaluation", shape)
    labels = np.asarray(eval_labels).reshape(-1)
    if len(labels) != len(evaluation):
        raise ValueError(f"{len(evaluation)} evaluation images but {len(labels)} labels.")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp.onnx", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _quantize_to(fp32_path, tmp, calibration, int(calibration_batch), per_channel)
        int8 = _session(tmp, intra_op_num_threads)
        e32, e8 = _embed(fp32, evaluation), _embed(int8, evaluation)
        max_diff, min_cos, mean_cos = embedding_agreement(e32, e8)
        (r1_32, map_32), (r1_8, map_8) = _retrieval(e32, labels), _retrieval(e8, labels)
        drop = 100.0 * (r1_32 - r1_8)
        if drop > max_r1_drop:
            raise QuantizationError(
                f"int8 Recall@1 {100 * r1_8:.2f} vs fp32 {100 * r1_32:.2f}: a drop of {drop:.2f} points > "
                f"tolerance {max_r1_drop:g} (MAP@R {100 * map_32:.2f} -> {100 * map_8:.2f}, max |diff| "
                f"{max_diff:.3g}, on {len(evaluation)} images); {out_path} not written. Use more / more "
                "representative calibration images, or keep the fp32 model."
            )
        latency = {}
        for batch in latency_batch_sizes:
            images = np.resize(evaluation, (int(batch), *shape))
            latency[int(batch)] = paired_latency({"fp32": fp32, "int8": int8}, images, latency_reps)
        speedup = {b: t["fp32"] / t["int8"] for b, t in latency.items()}
        _write_metadata(tmp, fp32_path, {
            "quantization": QUANTIZATION_NOTE, "quantization_num_calibration": str(len(calibration)),
            "quantization_eval_r1_fp32": f"{r1_32:.6f}", "quantization_eval_r1_int8": f"{r1_8:.6f}",
            "quantization_eval_max_abs_diff": f"{max_diff:.6g}",
        })  # fmt: skip
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        _publish(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return QuantizationReport(
        path=out_path, fp32_path=fp32_path, max_abs_diff=max_diff, min_cosine=min_cos, mean_cosine=mean_cos,
        r1_fp32=r1_32, r1_int8=r1_8, map_r_fp32=map_32, map_r_int8=map_8, r1_drop_points=drop,
        max_r1_drop=float(max_r1_drop), latency_ms=latency, speedup=speedup, num_calibration=len(calibration),
        num_eval=len(evaluation), size_mb={p: f.stat().st_size / 2**20 for p, f in (("fp32", fp32_path), ("int8", out_path))},
    )  # fmt: skip


__all__ = [
    "DEFAULT_MAX_R1_DROP",
    "QuantizationError",
    "QuantizationReport",
    "default_quantized_path",
    "embedding_agreement",
    "load_folder_images",
    "onnx_image_shape",
    "paired_latency",
    "quantize_onnx",
]
