"""Command lines of the export half: ``detreg-export-onnx`` and ``detreg-export-saved-model``.

``scripts/export_onnx.py`` and ``scripts/export_saved_model.py`` run these
functions. TensorFlow is imported only after the arguments are checked, so a
wrong path fails at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ONNX_HELP = """Export the inference path of a trained DReg model to ONNX, with a parity check.

    detreg-export-onnx runs/my_run --output model.onnx
    detreg-export-onnx runs/my_run/model.keras --output model.onnx --opset 17 --overwrite

The ONNX graph takes ``images``: float32 NHWC raw pixels in [0, 255] (dynamic
batch, the model's image size) and returns ``embeddings``: L2-normalised
embeddings of the minimising flow head. Provenance (model hash, image size,
preprocessing, detreg version...) is written into the ONNX metadata.

Opt-in int8 copy (the fp32 file is always written and never replaced):

    detreg-export-onnx runs/my_run --output model.onnx --quantize int8 \
        --calibration-dir data/train --eval-dir data/val --max-r1-drop 0.2

writes model.int8.onnx (--quantized-output) only if its Recall@1 on --eval-dir
(class sub-folders) is within --max-r1-drop points of the fp32 model's, and
prints its embedding error, Recall@1 / MAP@R change and speed-up.
--threshold T (or --threshold-from-index INDEX_DIR, a calibrated index) stores a
verification threshold in the metadata (read back as Embedder.threshold).

Exit status: 0 exported; 1 bad arguments / existing output / unreadable model;
2 parity check failed (onnxruntime and Keras differ by more than --atol; no file written);
3 the int8 model lost more Recall@1 than --max-r1-drop (fp32 written, int8 not).
"""
SAVED_MODEL_HELP = """Export a trained DReg model as a TF Serving SavedModel: BASE_DIR/NAME/VERSION/.

    detreg-export-saved-model runs/my_run/model.keras --base-dir serving/models --name detreg --version 1

Signatures (both return {"embeddings": float32 [batch, D]}, L2-normalised):
  serving_default  images: tf.string [batch]  encoded JPEG/PNG/BMP/GIF bytes,
                   decoded, converted to RGB and resized in the graph
                   (REST: {"instances": [{"b64": "..."}]})
  serving_pixels   images: float32 [batch, H, W, C] raw pixels in [0, 255]

Before the version folder appears, the SavedModel is restored the way TF
Serving restores it (a TF1 session, as SavedModelBundle and `saved_model_cli
run` do) and both signatures are compared with Keras (max abs diff <= 1e-5).
An existing version folder is never replaced unless --overwrite is given.
Exit status: 0 exported; 1 bad arguments / existing version / unreadable model;
2 parity check failed (nothing written).
"""


def _run_export(export: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """``(export(...), 0)``, or ``(None, status)`` after one ``error:`` line: 2 parity failed, 1 bad input."""
    from detreg_keras.export import ParityError  # noqa: PLC0415

    try:
        return export(*args, **kwargs), 0
    except ParityError as err:
        print(f"error: parity check failed: {err}", file=sys.stderr)
        return None, 2
    except (FileExistsError, FileNotFoundError, ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None, 1


def _onnx_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="detreg-export-onnx", description=ONNX_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", help="run directory holding model.keras, or a .keras file")
    p.add_argument("--output", "-o", required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: detreg_keras.export.DEFAULT_OPSET)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--atol", type=float, default=1e-5, help="parity tolerance (max abs diff), default 1e-5")
    p.add_argument("--check-batch-sizes", type=int, nargs="+", default=[1, 7], help="parity check batch sizes")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs Keras parity check")
    _quantize_args(p)
    return p.parse_args(argv)


def _quantize_args(p: argparse.ArgumentParser) -> None:
    """The opt-in int8 and threshold options of ``detreg-export-onnx``."""
    p.add_argument("--quantize", choices=["int8"], default=None, help="also write an int8 copy (recall-guarded)")
    p.add_argument("--calibration-dir", default=None, help="class-per-folder images setting the int8 scales")
    p.add_argument("--eval-dir", default=None, help="held-out class-per-folder images for the recall guard")
    p.add_argument("--max-r1-drop", type=float, default=0.2, help="largest Recall@1 drop in points (default 0.2)")
    p.add_argument("--max-calibration-images", type=int, default=256, help="random subset size (default 256)")
    p.add_argument("--quantized-output", default=None, help="int8 file (default: OUTPUT with .int8.onnx)")
    p.add_argument("--threshold", type=float, default=None, help="verification threshold stored in the metadata")
    p.add_argument("--threshold-from-index", default=None, help="store the threshold of this calibrated index")


def _quantize_problem(args: argparse.Namespace) -> str | None:
    """Why the quantize / threshold options cannot run (checked before TensorFlow loads), or ``None``."""
    if args.threshold is not None and args.threshold_from_index is not None:
        return "pass --threshold or --threshold-from-index, not both."
    if args.quantize is None:
        given = [f for f in ("calibration_dir", "eval_dir", "quantized_output") if getattr(args, f)]
        return f"--{given[0].replace('_', '-')} needs --quantize int8." if given else None
    if not args.calibration_dir:
        return "--quantize int8 needs calibration images: pass --calibration-dir DIR (class sub-folders)."
    if not args.eval_dir:
        return "--quantize int8 needs held-out labelled images for the recall guard: pass --eval-dir DIR."
    from detreg_keras.quantize import default_quantized_path  # noqa: PLC0415  (no TensorFlow)

    target = Path(args.quantized_output) if args.quantized_output else default_quantized_path(args.output)
    if target.exists():
        return f"{target} already exists; a quantized model never overwrites a file."
    return None


def _threshold_metadata(args: argparse.Namespace) -> dict[str, str]:
    """``extra_metadata`` with the verification threshold of ``--threshold`` / ``--threshold-from-index``."""
    from detreg_keras.export import threshold_metadata  # noqa: PLC0415

    if args.threshold is not None:
        return threshold_metadata(args.threshold)
    if args.threshold_from_index is None:
        return {}
    from detreg_runtime.index import EmbeddingIndex  # noqa: PLC0415

    index = EmbeddingIndex.load(args.threshold_from_index)
    if index.threshold is None:
        raise ValueError(f"The index {args.threshold_from_index} has no threshold: calibrate it first.")
    return threshold_metadata(index.threshold)


def _quantize_main(args: argparse.Namespace, fp32_path: Path) -> int:
    """Write the recall-guarded int8 copy of ``fp32_path``: exit 0, 1 bad input, 3 recall dropped too much."""
    from detreg_keras import quantize  # noqa: PLC0415

    try:
        shape = quantize.onnx_image_shape(fp32_path)
        calibration, _ = quantize.load_folder_images(args.calibration_dir, shape, args.max_calibration_images)
        images, labels = quantize.load_folder_images(args.eval_dir, shape)
        report = quantize.quantize_onnx(
            fp32_path, args.quantized_output, calibration, images, labels, max_r1_drop=args.max_r1_drop
        )
    except quantize.QuantizationError as err:
        print(f"error: int8 model refused: {err}", file=sys.stderr)
        return 3
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {report.path} ({report.size_mb['int8']:.1f} MiB, {quantize.QUANTIZATION_NOTE})")
    print("  " + report.summary().replace("\n", "\n  "))
    return 0


def export_onnx_main(argv=None) -> int:
    """``detreg-export-onnx`` (``scripts/export_onnx.py``): exit 0 exported, 1 bad input, 2 parity failed."""
    args = _onnx_args(argv)
    output = Path(args.output)
    if output.exists() and not args.overwrite:  # fail before loading TensorFlow
        print(f"error: {output} already exists; pass --overwrite to replace it.", file=sys.stderr)
        return 1
    problem = _quantize_problem(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    from detreg_keras.export import THRESHOLD_METADATA_KEY, export_onnx, onnx_op_counts  # noqa: PLC0415

    try:
        extra = _threshold_metadata(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    result, status = _run_export(
        export_onnx, args.model, output, opset=args.opset, overwrite=args.overwrite, check=not args.no_check,
        check_batch_sizes=args.check_batch_sizes, atol=args.atol, extra_metadata=extra,
    )  # fmt: skip
    if result is None:
        return status
    meta = result.metadata
    ops = onnx_op_counts(result.path)
    print(f"wrote {result.path} ({result.path.stat().st_size / 2**20:.1f} MiB, opset {meta['opset']})")
    shape = f"[batch, {meta['image_height']}, {meta['image_width']}, {meta['channels']}]"
    print(f"  input  {meta['input_name']}: float32 {shape} raw pixels in [0, 255]")
    print(f"  output {meta['output_name']}: float32 [batch, {meta['embedding_dim']}] (L2-normalised)")
    print(f"  model hash {result.model_hash}")
    if result.max_abs_diff is not None:
        print(f"  parity onnxruntime vs Keras: max abs diff {result.max_abs_diff:.3g} (<= {args.atol:g})")
    print(f"  Transpose nodes: {ops.get('Transpose', 0)}, Conv nodes: {ops.get('Conv', 0)}")
    if THRESHOLD_METADATA_KEY in meta:
        print(f"  verification threshold {meta[THRESHOLD_METADATA_KEY]} (metadata; Embedder.threshold)")
    return _quantize_main(args, result.path) if args.quantize else 0



def _saved_model_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="detreg-export-saved-model",
        description=SAVED_MODEL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="run directory holding model.keras, or a .keras file")
    p.add_argument("--base-dir", required=True, help="TF Serving model base folder (mounted into the container)")
    p.add_argument("--name", required=True, help="model name (the URL's /v1/models/NAME)")
    p.add_argument("--version", type=int, required=True, help="positive integer version")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version folder")
    p.add_argument("--no-check", action="store_true", help="skip the SavedModel vs Keras parity check")
    return p.parse_args(argv)


def export_saved_model_main(argv=None) -> int:
    """``detreg-export-saved-model`` (``scripts/export_saved_model.py``): exit 0 written, 1 bad input, 2 parity."""
    args = _saved_model_args(argv)
    target = Path(args.base_dir) / args.name / str(args.version)
    if args.version < 1:
        print(f"error: --version must be a positive integer, got {args.version}.", file=sys.stderr)
        return 1
    if target.exists() and not args.overwrite:
        print(f"error: {target} already exists; choose another --version (or --overwrite).", file=sys.stderr)
        return 1
    from detreg_keras.export import export_saved_model  # noqa: PLC0415

    result, status = _run_export(
        export_saved_model, args.model, args.base_dir, args.name, args.version, overwrite=args.overwrite,
        check=not args.no_check,
    )  # fmt: skip
    if result is None:
        return status
    meta = result.metadata
    print(f"wrote {result.path}")
    print(f"  serving_default: images tf.string [batch] -> embeddings float32 [batch, {meta['embedding_dim']}]")
    print(f"  serving_pixels:  images float32 [batch, {meta['image_height']}, {meta['image_width']}, "
          f"{meta['channels']}] -> embeddings")
    print(f"  model hash {result.model_hash}")
    if result.max_abs_diff is not None:
        print(f"  parity (TF1 session loader, both signatures) vs Keras: max abs diff {result.max_abs_diff:.3g}")
    print(f"  check: saved_model_cli show --dir {result.path} --all")
    return 0
