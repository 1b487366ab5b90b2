"""Omniglot benchmark: plain Proxy Anchor vs DReg, same backbone, budget and seeds.

Train on the 136 characters of ``images_background_small1`` (Balinese,
Early_Aramaic, Greek, Korean, Latin), retrieve among the 106 unseen characters
of Japanese_(katakana), Sanskrit and Tagalog: the Omniglot benchmark embedded in
the package (``load_omniglot_split``; ``--data-root`` reads the same images from
the zips), with the ``omniglot`` preset of :mod:`detreg_keras.training` for both methods:
the only difference is ``flow="none"`` (plain Proxy Anchor on the embedding)
versus the dueling RealNVP heads with the determinant regulariser.

    python scripts/omniglot_benchmark.py --seeds 0 1 2 --output runs/omniglot-benchmark --results-md RESULTS.md

writes one run folder per (method, seed) under ``OUTPUT/runs``, then
``OUTPUT/results.json``, ``OUTPUT/RESULTS.md`` (and ``--results-md``) with
per-seed numbers and mean ± std, and ``OUTPUT/recall_at_k.png``. Re-running
the same command after an interruption reuses finished runs and resumes the
interrupted one.

Tuning (never on the test alphabets): ``--evaluate-on val --val-classes 34``
trains on the other training characters and reports the metrics of the 34
held-out training characters instead; ``--set KEY=VALUE`` overrides a preset
field for both methods, ``--dreg KEY=VALUE`` for DReg only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from detreg_keras.evaluation import plot_recall_at_k
from detreg_keras.training import (
    TrainConfig,
    load_run_config,
    resolve_config,
    run_training,
)

METHODS = {"Proxy Anchor": {"flow": "none"}, "DReg": {"flow": "realnvp"}}
#: metric key -> column title
COLUMNS = {
    "recall@1": "R@1",
    "recall@2": "R@2",
    "recall@4": "R@4",
    "recall@8": "R@8",
    "map@r": "MAP@R",
    "nmi": "NMI",
}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None if text.lower() == "none" else text


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return out


def run_one(cfg: TrainConfig) -> dict[str, Any]:
    """Runs (or reuses / resumes) the run folder of ``cfg``; returns its metrics.json."""
    run_dir = Path(cfg.output_dir) / str(cfg.run_name)
    if (run_dir / "metrics.json").is_file():
        if load_run_config(run_dir).to_dict() != {**cfg.to_dict(), "verbose": load_run_config(run_dir).verbose}:
            raise SystemExit(f"{run_dir} holds a finished run with another config; choose another --output.")
        print(f"  reusing finished run {run_dir}")
        return json.loads((run_dir / "metrics.json").read_text())
    if (run_dir / "config.json").is_file():
        print(f"  resuming {run_dir}")
        return run_training(load_run_config(run_dir), resume=run_dir)["metrics"]
    return run_training(cfg)["metrics"]


def _fmt(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def summarise(results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean and sample std (n-1) of every metric, per method."""
    summary: dict[str, dict[str, Any]] = {}
    for method, by_seed in results.items():
        keys = [k for k in COLUMNS if all(k in m for m in by_seed.values())]
        summary[method] = {
            k: {
                "mean": statistics.fmean([m[k] for m in by_seed.values()]),
                "std": statistics.stdev([m[k] for m in by_seed.values()]) if len(by_seed) > 1 else 0.0,
            }
            for k in keys
        }
    return summary


def markdown(
    results: dict[str, dict[int, dict[str, Any]]],
    configs: dict[str, TrainConfig],
    args: argparse.Namespace,
    wall_seconds: float,
    command: str,
) -> str:
    split = "validation characters (34 of the training characters)" if args.evaluate_on == "val" else (
        "test alphabets: Japanese_(katakana), Sanskrit, Tagalog (106 unseen characters, 2,120 images)"
    )
    cfg = configs.get("DReg") or next(iter(configs.values()))
    lines = [
        "## Omniglot: plain Proxy Anchor vs DReg",
        "",
        f"Command: `{command}`",
        "",
        f"* Evaluation: {split}; all-vs-all retrieval, cosine similarity.",
        (
            "* Training: the 136 characters of `images_background_small1` (2,720 images)"
            + (f" minus {cfg.val_classes} validation characters" if cfg.val_classes else "")
            + f"; preset `omniglot`: `{cfg.backbone}` {tuple(cfg.cnn_widths)} from scratch on "
            f"{cfg.image_size}x{cfg.image_size} {'grayscale' if cfg.channels == 1 else 'RGB'} images, "
            f"{cfg.epochs} epochs, batches of {cfg.batch_size} ({cfg.sampler}, {cfg.samples_per_class} per class), "
            f"embedding {cfg.embedding_dim}, AdamW lr {cfg.learning_rate:g} (proxies x{cfg.proxy_lr_multiplier:g}), "
            "linear decay to 0."
        ),
        (
            f"* DReg: {cfg.num_couplings} RealNVP couplings per head (hidden {cfg.hidden_units}), "
            f"{'dueling' if cfg.dueling else 'single head'}, lambda_min = {cfg.lambda_min:g}, "
            f"lambda_max = {cfg.lambda_max:g}, epsilon = {cfg.epsilon:g}, flow heads at "
            f"{cfg.head_lr_multiplier:g} x the backbone lr ({cfg.learning_rate * cfg.head_lr_multiplier:g}). "
            'Proxy Anchor: the same model and recipe with `flow="none"`.'
        ),
        (
            f"* Seeds: {', '.join(str(s) for s in args.seeds)}; a seed fixes the initial backbone and embedding "
            "layer, the batches and the augmentations, identical for both methods. Mean ± sample standard "
            "deviation (n-1) over seeds. Final epoch, no model selection."
        ),
        (
            f"* Wall time: {wall_seconds / 60:.1f} min for the whole command on {platform.machine()} "
            f"({_cpu_note()}), including data loading and evaluation."
        ),
        "",
        "| Method | " + " | ".join(COLUMNS.values()) + " |",
        "|:--|" + "--:|" * len(COLUMNS),
    ]
    for method, by_seed in results.items():
        cells = [_fmt([m[k] for m in by_seed.values()]) if all(k in m for m in by_seed.values()) else "-" for k in COLUMNS]
        lines.append(f"| **{method}** (mean ± std) | " + " | ".join(cells) + " |")
    lines += ["", "Per seed:", "", "| Method | Seed | " + " | ".join(COLUMNS.values()) + " | train s |", "|:--|--:|" + "--:|" * (len(COLUMNS) + 1)]
    for method, by_seed in results.items():
        for seed, m in by_seed.items():
            cells = [f"{100 * m[k]:.2f}" if k in m else "-" for k in COLUMNS]
            lines.append(f"| {method} | {seed} | " + " | ".join(cells) + f" | {m.get('train_seconds', float('nan')):.0f} |")
    return "\n".join(lines) + "\n"


def _cpu_note() -> str:
    return f"{os.cpu_count()} CPU cores visible"


def main(argv: list[str] | None = None) -> int:
    """Runs the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output", default="runs/omniglot-benchmark", help="folder for the runs and the results")
    p.add_argument("--results-md", default=None, help="also write the results table to this file (e.g. RESULTS.md)")
    p.add_argument("--data-root", default=None, help="folder of the small Omniglot zips (default: the embedded copy)")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    p.add_argument("--evaluate-on", choices=("test", "val"), default="test")
    p.add_argument("--val-classes", type=int, default=34, help="validation characters with --evaluate-on val")
    p.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field for both methods (repeatable)")
    p.add_argument("--dreg", action="append", default=[], metavar="KEY=VALUE", help="override a field for DReg only")
    p.add_argument("--verbose", type=int, default=0, choices=(0, 1, 2))
    args = p.parse_args(argv)

    common = _parse_overrides(args.common)
    dreg = _parse_overrides(args.dreg)
    if args.data_root:
        common["data_root"] = args.data_root
    if args.evaluate_on == "val":
        common.update(evaluate_on="val", val_classes=args.val_classes)
    out = Path(args.output)
    command = "python scripts/omniglot_benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)

    start = time.perf_counter()
    results: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in args.methods}
    configs: dict[str, TrainConfig] = {}
    for seed in args.seeds:
        for method in args.methods:
            overrides = {**common, **METHODS[method], **(dreg if method == "DReg" else {})}
            cfg = resolve_config(
                "omniglot",
                **overrides,
                seed=seed,
                output_dir=str(out / "runs"),
                run_name=f"{method.lower().replace(' ', '_')}-seed{seed}",
                verbose=args.verbose,
            )
            configs[method] = cfg
            t0 = time.perf_counter()
            print(f"[{method}, seed {seed}] training ...", flush=True)
            metrics = run_one(cfg)
            results[method][seed] = metrics
            shown = "  ".join(f"{name}={100 * metrics[k]:.2f}" for k, name in COLUMNS.items() if k in metrics)
            print(f"[{method}, seed {seed}] {shown}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    wall = time.perf_counter() - start

    summary = summarise(results)
    (out / "results.json").write_text(
        json.dumps(
            {
                "command": command,
                "wall_seconds": wall,
                "configs": {m: c.to_dict() for m, c in configs.items()},
                "per_seed": {m: {str(s): r for s, r in by.items()} for m, by in results.items()},
                "summary": summary,
            },
            indent=2,
        )
    )
    curves = {m: {k: v["mean"] for k, v in s.items()} for m, s in summary.items()}
    plot_recall_at_k(curves, out / "recall_at_k.png", title="Omniglot, unseen alphabets: mean Recall@k")
    text = markdown(results, configs, args, wall, command)
    (out / "RESULTS.md").write_text(text)
    if args.results_md:
        Path(args.results_md).write_text(text)
    print(text)
    print(f"wall time: {wall / 60:.1f} min; results in {out}")
    return 0

