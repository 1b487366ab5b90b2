#!/usr/bin/env python
"""Export a trained DReg model as a TF Serving SavedModel: BASE_DIR/NAME/VERSION/.

    python scripts/export_saved_model.py runs/my_run/model.keras --base-dir serving/models --name detreg --version 1

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

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run directory holding model.keras, or a .keras file")
    p.add_argument("--base-dir", required=True, help="TF Serving model base folder (mounted into the container)")
    p.add_argument("--name", required=True, help="model name (the URL's /v1/models/NAME)")
    p.add_argument("--version", type=int, required=True, help="positive integer version")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version folder")
    p.add_argument("--no-check", action="store_true", help="skip the SavedModel vs Keras parity check")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    target = Path(args.base_dir) / args.name / str(args.version)
    if args.version < 1:
        print(f"error: --version must be a positive integer, got {args.version}.", file=sys.stderr)
        return 1
    if target.exists() and not args.overwrite:
        print(f"error: {target} already exists; choose another --version (or --overwrite).", file=sys.stderr)
        return 1
    from detreg_keras.export import ParityError, export_saved_model  # noqa: PLC0415

    try:
        result = export_saved_model(
            args.model, args.base_dir, args.name, args.version, overwrite=args.overwrite, check=not args.no_check
        )
    except ParityError as err:
        print(f"error: parity check failed: {err}", file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError, ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
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


if __name__ == "__main__":
    sys.exit(main())
