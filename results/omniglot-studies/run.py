"""One cell of the Omniglot studies of issues 17 and 18: ``run_training`` on the ``omniglot`` preset.

    python results/omniglot-studies/run.py --out test/margin_spc2_s0.json seed=0 flow='"none"' loss='"margin"' ...

Overrides are ``key=value`` with JSON values (as ``results/omniglot-head-lr/probe.py``). Writes one JSON
object: the overrides, the final metrics (on the test alphabets, or on the validation characters with
``evaluate_on="val" val_classes=34``), the run's wall time, the seconds of each epoch and, for the
embedded samplers, the seconds spent re-embedding the training pool (``pool_refresh_s``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from detreg_keras.training import read_history, resolve_config, run_training  # noqa: E402


def parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="JSON file of the result (must not exist)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; not overwriting it")
    overrides = {"verbose": 0, **parse_overrides(args.overrides)}
    start = time.time()
    result = run_training(resolve_config("omniglot", **overrides))
    rows = read_history(result["run_dir"])
    row = {
        "overrides": overrides,
        "run_dir": result["run_dir"],
        "wall_s": time.time() - start,
        "epoch_seconds": [r.get("epoch_seconds") for r in rows],
        "pool_refresh_s": [r.get("pool_refresh_s") for r in rows if "pool_refresh_s" in r],
        "load_avg_1min_at_end": os.getloadavg()[0],
        **{k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1) + "\n")
    print("FINAL", out, json.dumps({k: row[k] for k in ("recall@1", "map@r", "wall_s")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
