#!/usr/bin/env python
"""Export the inference path of a trained DReg model to ONNX, with a parity check.

    python scripts/export_onnx.py runs/my_run --output model.onnx
    python scripts/export_onnx.py runs/my_run/model.keras --output model.onnx --opset 17 --overwrite

The ONNX graph takes ``images``: float32 NHWC raw pixels in [0, 255] (dynamic
batch, the model's image size) and returns ``embeddings``: L2-normalised
embeddings of the minimising flow head. Provenance (model hash, image size,
preprocessing, detreg version...) is written into the ONNX metadata.

Exit status: 0 exported; 1 bad arguments / existing output / unreadable model;
2 parity check failed (onnxruntime and Keras differ by more than --atol; no file written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run directory holding model.keras, or a .keras file")
    p.add_argument("--output", "-o", required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: detreg_keras.export.DEFAULT_OPSET)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--atol", type=float, default=1e-5, help="parity tolerance (max abs diff), default 1e-5")
    p.add_argument("--check-batch-sizes", type=int, nargs="+", default=[1, 7], help="parity check batch sizes")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs Keras parity check")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    output = Path(args.output)
    if output.exists() and not args.overwrite:  # fail before loading TensorFlow
        print(f"error: {output} already exists; pass --overwrite to replace it.", file=sys.stderr)
        return 1
    from detreg_keras.export import ParityError, export_onnx, onnx_op_counts  # noqa: PLC0415

    try:
        result = export_onnx(
            args.model,
            output,
            opset=args.opset,
            overwrite=args.overwrite,
            check=not args.no_check,
            check_batch_sizes=args.check_batch_sizes,
            atol=args.atol,
        )
    except ParityError as err:
        print(f"error: parity check failed: {err}", file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError, ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
