"""Run ablation studies (a grid of variants × seeds) and write tables and a plot.

    python scripts/ablate.py --config configs/ablation_omniglot.json
    python scripts/ablate.py --preset digits --study dueling regularization --seeds 0 1 2 --set epochs=5

Re-running the same command skips finished cells and resumes interrupted ones.
Two processes pinned to one core each usually finish a grid sooner than one:

    taskset -c 0 python scripts/ablate.py --config C --shard 0/2 &
    taskset -c 1 python scripts/ablate.py --config C --shard 1/2; wait
    python scripts/ablate.py --config C      # reads the runs back, writes the tables
Outputs in --output-dir: results.csv, results.md (mean ± std over seeds),
recall_at_1.png, and one run folder per cell and seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from detreg_keras.ablation import STUDIES, AblationConfig, run_ablation


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    """Runs the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON file with AblationConfig fields (flags below override it)")
    p.add_argument("--preset")
    p.add_argument("--study", nargs="+", choices=STUDIES)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="TrainConfig overrides for every cell (the budget), e.g. epochs=5 image_size=28")
    p.add_argument("--output-dir")
    p.add_argument("--shard", metavar="I/N",
                   help="train only every N-th distinct run from the I-th (N processes split the grid; "
                        "run once more without --shard to write the tables)")
    args = p.parse_args(argv)
    cfg = AblationConfig.from_file(args.config) if args.config else AblationConfig()
    if args.preset:
        cfg.preset = args.preset
    if args.study:
        cfg.studies = args.study
    if args.seeds:
        cfg.seeds = args.seeds
    if args.output_dir:
        cfg.output_dir = args.output_dir
    for item in args.set:
        if "=" not in item:
            p.error(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        cfg.overrides = {**cfg.overrides, key: _parse_value(value)}
    result = run_ablation(cfg, shard=args.shard)
    if args.shard:
        print(f"shard {args.shard}: {len(result['trained'])} runs done; rerun without --shard for the tables")
        return 0
    print(Path(result["markdown"]).read_text())
    print(f"tables: {result['csv']}, {result['markdown']}; plot: {result['plot']}")
    return 0

