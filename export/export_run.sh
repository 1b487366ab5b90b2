#!/usr/bin/env bash
# One training run folder -> every deployable artefact, each parity-checked on the way:
#   OUT/model.onnx (onnxruntime, detreg-serve), OUT/saved_models/NAME/VERSION (TF Serving),
#   and with a gallery folder (one sub-folder per class) OUT/index (faiss, built from model.onnx).
# Usage: export/export_run.sh RUN_DIR OUT_DIR [GALLERY_DIR]   (PYTHON=..., NAME=detreg, VERSION=1)
set -euo pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: $0 RUN_DIR OUT_DIR [GALLERY_DIR]" >&2
    exit 1
fi
run=$1 out=$2 gallery=${3:-}
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python}
mkdir -p "$out"
"$py" "$repo/scripts/export_onnx.py" "$run" --output "$out/model.onnx"
"$py" "$repo/scripts/export_saved_model.py" "$run" --base-dir "$out/saved_models" \
    --name "${NAME:-detreg}" --version "${VERSION:-1}"
if [ -n "$gallery" ]; then
    "$py" "$repo/scripts/detreg_index.py" build --model "$out/model.onnx" --images "$gallery" --output "$out/index"
fi
