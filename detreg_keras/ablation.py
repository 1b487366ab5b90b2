"""Config-driven ablation studies: a grid of variants × seeds on a dataset preset.

The studies of the paper (Sec. 5.4) and the ones its ablation plan asks for:

============================  ==================================================
``flow-type``                 Real-NVP vs NICE heads
``lambda``                    λ1 = λ2 ∈ {0.01, 0.05, 0.1, 0.2, 0.5} and λ1 ≠ λ2 points
``epsilon``                   ε ∈ {0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8} and no augmentation
``dueling``                   dueling heads vs one head with only +λ1·R(Z1) (missing in the paper)
``regularization``            λ1 = λ2 = 0 on the same two-flow architecture, and plain
                              Proxy Anchor without flows (missing in the paper)
``regularizer-form``          Eq. 7/10 (log1p) vs Eq. 6 (log-det)
``losses``                    every base loss of :mod:`detreg_keras.losses`, with and without DReg
============================  ==================================================

Every cell is a :func:`detreg_keras.training.run_training` run folder
``OUTPUT/STUDY/CELL/seed-S``. A finished cell (``metrics.json`` present) is read
back instead of re-run, and an interrupted one is resumed, so re-running the
same command completes a partial grid without redoing finished cells. Cells of
different studies that train the same configuration share one run, and
``shard="I/N"`` splits the distinct runs between N processes.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Cell = tuple[str, dict[str, Any]]

LAMBDAS = (0.01, 0.05, 0.1, 0.2, 0.5)
UNEQUAL_LAMBDAS = ((0.05, 0.01), (0.01, 0.05), (0.1, 0.05), (0.05, 0.1))
EPSILONS = (0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8)


def _loss_cells() -> list[Cell]:
    from detreg_keras.losses import LOSSES  # noqa: PLC0415

    cells: list[Cell] = []
    for name in sorted(LOSSES):
        cells.append((f"{name}", {"loss": name, "flow": "none"}))
        cells.append((f"{name}+dreg", {"loss": name}))
    return cells


def study_cells(study: str) -> list[Cell]:
    """The ``(cell name, TrainConfig overrides)`` of a named study.

    Raises:
        ValueError: unknown study name.
    """
    if study == "flow-type":
        return [("realnvp", {"flow": "realnvp"}), ("nice", {"flow": "nice"})]
    if study == "lambda":
        cells = [(f"lambda={lam:g}", {"lambda_min": lam, "lambda_max": lam}) for lam in LAMBDAS]
        cells += [(f"lambda1={a:g},lambda2={b:g}", {"lambda_min": a, "lambda_max": b}) for a, b in UNEQUAL_LAMBDAS]
        return cells
    if study == "epsilon":
        return [(f"epsilon={eps:g}", {"epsilon": eps}) for eps in EPSILONS] + [("no-augmentation", {"epsilon": 0.0})]
    if study == "dueling":
        return [("dueling", {"dueling": True}), ("single-head-min-only", {"dueling": False})]
    if study == "regularization":
        return [
            ("dreg", {}),
            ("two-flows-lambda=0", {"lambda_min": 0.0, "lambda_max": 0.0}),
            ("proxy-anchor-no-flows", {"flow": "none"}),
        ]
    if study == "regularizer-form":
        return [("log1p-eq7-10", {"regularizer_form": "log1p"}), ("logdet-eq6", {"regularizer_form": "logdet"})]
    if study == "losses":
        return _loss_cells()
    raise ValueError(f"Unknown study {study!r}; expected one of {STUDIES}.")


STUDIES = ("flow-type", "lambda", "epsilon", "dueling", "regularization", "regularizer-form", "losses")


@dataclass
class AblationConfig:
    """A grid: studies × cells × seeds on one preset with a fixed budget.

    Attributes:
        preset: :data:`detreg_keras.training.PRESETS` name.
        studies: study names from :data:`STUDIES`.
        seeds: training seeds; every cell runs every seed.
        overrides: TrainConfig fields applied to every cell (the budget: epochs,
            image size, embedding size ...). A cell's own overrides win.
        output_dir: where the grid's run folders and tables go.
        ks: Recall@k cut-offs reported (k larger than the gallery is dropped).
        cell_seeds: per-cell seed lists that replace ``seeds`` for those cells
            (e.g. secondary points of a study run on one seed to fit a budget);
            keys are cell names, and every key must name a cell of the studies.
    """

    preset: str = "omniglot"
    studies: Sequence[str] = ("dueling", "regularization", "lambda")
    seeds: Sequence[int] = (0, 1, 2)
    overrides: dict[str, Any] = field(default_factory=dict)
    output_dir: str = "ablations"
    ks: Sequence[int] = (1, 2, 4, 8, 10, 100)
    cell_seeds: dict[str, Sequence[int]] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path) -> AblationConfig:
        data = json.loads(Path(path).read_text())
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"Unknown keys in {path}: {sorted(unknown)}.")
        return cls(**data)


def _cell_dir(output_dir: Path, study: str, cell: str, seed: int) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "=.,+-_" else "_" for ch in cell)
    return output_dir / study / safe / f"seed-{seed}"


def run_cell(cfg: AblationConfig, study: str, cell: str, cell_overrides: dict[str, Any], seed: int) -> dict[str, Any]:
    """Run (or read back, or resume) one cell for one seed; returns its metrics."""
    from detreg_keras import training  # noqa: PLC0415  (heavy: TensorFlow)

    run_dir = _cell_dir(Path(cfg.output_dir), study, cell, seed)
    metrics_file = run_dir / "metrics.json"
    if metrics_file.exists():
        return json.loads(metrics_file.read_text())
    start = time.perf_counter()
    if (run_dir / "config.json").exists():
        result = training.run_training(training.load_run_config(run_dir), resume=run_dir)
    else:
        overrides = {
            **cfg.overrides,
            **cell_overrides,
            "seed": seed,
            "ks": list(cfg.ks),
            "output_dir": str(run_dir.parent),
            "run_name": run_dir.name,
        }
        result = training.run_training(training.resolve_config(cfg.preset, **overrides))
    metrics = dict(result["metrics"])
    metrics.setdefault("wall_seconds", time.perf_counter() - start)
    return metrics


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype="float64")
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def summarize(results: dict[str, dict[str, list[dict[str, Any]]]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Rows ``{study, cell, n_seeds, <key>_mean, <key>_std ...}`` from per-seed metrics."""
    rows = []
    for study, cells in results.items():
        for cell, per_seed in cells.items():
            row: dict[str, Any] = {"study": study, "cell": cell, "n_seeds": len(per_seed)}
            for key in keys:
                mean, std = _mean_std([m.get(key) for m in per_seed])
                row[f"{key}_mean"], row[f"{key}_std"] = mean, std
            rows.append(row)
    return rows


def _metric_keys(results: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    preferred = ["recall@1", "recall@2", "recall@4", "recall@8", "recall@10", "recall@100", "map@r", "nmi"]
    present = {k for cells in results.values() for per_seed in cells.values() for m in per_seed for k in m}
    keys = [k for k in preferred if k in present]
    for k in ("train_seconds", "wall_seconds"):
        if k in present:
            keys.append(k)
    return keys


def write_tables(rows: list[dict[str, Any]], keys: Sequence[str], output_dir: Path) -> tuple[Path, Path]:
    """Write ``results.csv`` and ``results.md`` (mean ± std; percentages for retrieval metrics)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = output_dir / "results.csv", output_dir / "results.md"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["study", "cell"])
        writer.writeheader()
        writer.writerows(rows)
    lines = []
    for study in dict.fromkeys(r["study"] for r in rows):
        lines += [f"### {study}", "", "| cell | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for row in (r for r in rows if r["study"] == study):
            cells = []
            for key in keys:
                mean, std = row[f"{key}_mean"], row[f"{key}_std"]
                scale, fmt = (1.0, "{:.1f} ± {:.1f}") if key.endswith("seconds") else (100.0, "{:.2f} ± {:.2f}")
                cells.append("n/a" if math.isnan(mean) else fmt.format(scale * mean, scale * std))
            lines.append(f"| {row['cell']} | {row['n_seeds']} | " + " | ".join(cells) + " |")
        lines.append("")
    md_path.write_text("\n".join(lines))
    return csv_path, md_path


def plot_results(rows: list[dict[str, Any]], output_dir: Path, key: str = "recall@1") -> Path:
    """Bar chart of ``key`` (mean ± std over seeds), one panel per study."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    studies = list(dict.fromkeys(r["study"] for r in rows))
    fig = Figure(figsize=(max(6, 4 * len(studies)), 4.5))
    FigureCanvasAgg(fig)
    for i, study in enumerate(studies):
        ax = fig.add_subplot(1, len(studies), i + 1)
        sub = [r for r in rows if r["study"] == study]
        means = [100 * r[f"{key}_mean"] for r in sub]
        stds = [100 * r[f"{key}_std"] for r in sub]
        ax.bar(range(len(sub)), means, yerr=stds, capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(sub)))
        ax.set_xticklabels([r["cell"] for r in sub], rotation=45, ha="right", fontsize=7)
        finite = [m for m in means if not math.isnan(m)]
        if finite:
            ax.set_ylim(max(0.0, min(finite) - 10), min(100.0, max(finite) + 5))
        ax.set_title(study)
        ax.set_ylabel(f"{key} (%)")
    fig.tight_layout()
    path = output_dir / f"{key.replace('@', '_at_')}.png"
    fig.savefig(path, dpi=120)
    return path


def _config_key(cfg: AblationConfig, overrides: dict[str, Any], seed: int) -> str:
    """What a cell trains, as a string: two cells with the same key are the same run."""
    from dataclasses import asdict  # noqa: PLC0415

    from detreg_keras import training  # noqa: PLC0415

    resolved = asdict(training.resolve_config(cfg.preset, **{**cfg.overrides, **overrides, "seed": seed}))
    for where in ("output_dir", "run_name"):
        resolved.pop(where, None)
    return json.dumps(resolved, sort_keys=True, default=str)


def plan_jobs(cfg: AblationConfig) -> list[dict[str, Any]]:
    """Every ``(study, cell, seed)`` of the grid, with the run it shares with an earlier cell.

    Cells that resolve to the same training configuration (``dreg`` of the
    regularization study, ``dueling`` of the dueling study and ``lambda=0.05``
    of the lambda study are all the default DReg run) are trained once: the
    later ones get ``same_as`` = the ``(study, cell)`` that owns the run.
    """
    names = {cell for study in cfg.studies for cell, _ in study_cells(study)}  # unknown study: ValueError
    unknown = sorted(set(cfg.cell_seeds) - names)
    if unknown:
        raise ValueError(f"cell_seeds names cells {unknown} that are not in the studies {list(cfg.studies)}.")
    owners: dict[str, tuple[str, str]] = {}
    jobs = []
    for study in cfg.studies:
        for cell, overrides in study_cells(study):
            for seed in cfg.cell_seeds.get(cell, cfg.seeds):
                key = _config_key(cfg, overrides, seed)
                owner = owners.setdefault(key, (study, cell))
                jobs.append({"study": study, "cell": cell, "overrides": overrides, "seed": seed,
                             "same_as": None if owner == (study, cell) else owner})
    return jobs


def _parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    if shard is None:
        return None
    if isinstance(shard, str):
        try:
            index, count = (int(part) for part in shard.split("/"))
        except ValueError:
            raise ValueError(f"shard must look like 'I/N' (e.g. 0/2), got {shard!r}.") from None
    else:
        index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard I/N needs 0 <= I < N, got {index}/{count}.")
    return index, count


def run_ablation(cfg: AblationConfig, log=print, shard: str | tuple[int, int] | None = None) -> dict[str, Any]:
    """Run every cell × seed of ``cfg`` (skipping finished ones), then write the tables and plot.

    Args:
        cfg: the grid.
        log: progress printer.
        shard: ``"I/N"`` trains only every N-th distinct run starting at the
            I-th, so that N processes (or machines sharing the output folder)
            split a grid; a shard writes no tables. Re-running without a shard
            reads every finished run back and writes the tables.
    """
    shard = _parse_shard(shard)
    jobs = plan_jobs(cfg)
    owned = [job for job in jobs if job["same_as"] is None]
    if shard is not None:
        index, count = shard
        mine = owned[index::count]
        for job in mine:
            log(f"[{job['study']}] {job['cell']} seed={job['seed']} (shard {index}/{count})")
            run_cell(cfg, job["study"], job["cell"], job["overrides"], job["seed"])
        return {"trained": [(j["study"], j["cell"], j["seed"]) for j in mine]}
    by_run: dict[tuple[str, str, int], dict[str, Any]] = {}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for job in jobs:
        study, cell, seed = job["study"], job["cell"], job["seed"]
        if job["same_as"] is None:
            log(f"[{study}] {cell} seed={seed}")
            metrics = run_cell(cfg, study, cell, job["overrides"], seed)
            by_run[(study, cell, seed)] = metrics
        else:
            log(f"[{study}] {cell} seed={seed}: same run as [{job['same_as'][0]}] {job['same_as'][1]}")
            metrics = by_run[(*job["same_as"], seed)]
        results.setdefault(study, {}).setdefault(cell, []).append(metrics)
    keys = _metric_keys(results)
    rows = summarize(results, keys)
    output_dir = Path(cfg.output_dir)
    csv_path, md_path = write_tables(rows, keys, output_dir)
    png_path = plot_results(rows, output_dir)
    (output_dir / "ablation_config.json").write_text(json.dumps(cfg.__dict__, indent=2, default=list))
    return {"rows": rows, "csv": str(csv_path), "markdown": str(md_path), "plot": str(png_path)}
