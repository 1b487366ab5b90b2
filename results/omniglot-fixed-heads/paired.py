"""Per-cell tables with differences paired by seed, from probe files ``p_CELL_sSEED.jsonl``.

    python results/omniglot-fixed-heads/paired.py DIR REFERENCE [CELL ...]

For every cell: mean ± sample std (n-1) over its seeds of R@1, MAP@R and the last
epoch's head probe (R(Z1), R(Z2), max |s| of head 1, on 256 fixed training
images), then the difference cell - REFERENCE on the seeds both have, its mean ±
std and the per-seed values. Nothing is selected: every finished seed is shown.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

METRICS = (("recall@1", "R@1", 100.0), ("map@r", "MAP@R", 100.0))
PROBES = (("R_min", "R(Z1)"), ("R_max", "R(Z2)"), ("max_s_min", "max abs s (1)"))


def read_cells(folder: Path) -> dict[str, dict[int, dict]]:
    """cell -> seed -> {metric or probe key: value, "train_seconds": ...} for finished runs."""
    cells: dict[str, dict[int, dict]] = defaultdict(dict)
    for path in sorted(folder.glob("p_*_s*.jsonl")):
        match = re.fullmatch(r"p_(.+)_s(\d+)", path.stem)
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        final = next((r for r in rows if r.get("final")), None)
        if match is None or final is None:
            continue
        epochs = [r for r in rows if "epoch" in r and not r.get("final")]
        cells[match.group(1)][int(match.group(2))] = {**(epochs[-1] if epochs else {}), **final}
    return cells


def mean_std(values: list[float], digits: int = 2) -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def column(by_seed: dict[int, dict], key: str, scale: float = 1.0) -> list[float]:
    return [scale * run[key] for _, run in sorted(by_seed.items()) if run.get(key) is not None]


def paired(by_seed: dict[int, dict], ref: dict[int, dict], key: str, scale: float, digits: int = 2) -> tuple[str, str]:
    seeds = sorted(set(by_seed) & set(ref))
    diffs = [scale * (by_seed[s][key] - ref[s][key]) for s in seeds]
    return mean_std(diffs, digits), ", ".join(f"{d:+.{digits}f}" for d in diffs) or "—"


def table(cells: dict[str, dict[int, dict]], reference: str, names: list[str]) -> str:
    ref = cells.get(reference, {})
    head = ["cell", "seeds"] + [t for _, t, _ in METRICS] + [t for _, t in PROBES]
    head += ["train s", f"ΔR@1 vs {reference}", "per seed", f"ΔMAP@R vs {reference}", "per seed",
             f"ΔR(Z1) vs {reference}", "per seed"]
    lines = ["| " + " | ".join(head) + " |", "|:--|--:|" + "--:|" * (len(head) - 2)]
    for name in names:
        by_seed = cells.get(name)
        if not by_seed:
            continue
        row = [name, ",".join(str(s) for s in sorted(by_seed))]
        row += [mean_std(column(by_seed, k, sc)) for k, _, sc in METRICS]
        row += [mean_std(column(by_seed, k)) for k, _ in PROBES]
        row.append(f"{statistics.fmean(column(by_seed, 'train_seconds')):.0f}")
        for key, _, scale in (*METRICS, ("R_min", "R(Z1)", 1.0)):
            usable = name != reference and all(run.get(key) is not None for run in (*by_seed.values(), *ref.values()))
            row += list(paired(by_seed, ref, key, scale, digits=3 if key == "R_min" else 2)) if usable else ["—", "—"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print(__doc__)
        return 2
    cells = read_cells(Path(args[0]))
    names = args[2:] or sorted(cells)
    print(table(cells, args[1], names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
