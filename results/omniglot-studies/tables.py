"""Tables of the Omniglot studies: mean ± sd over seeds and differences paired by seed.

    python results/omniglot-studies/tables.py results/omniglot-studies/test REFERENCE CELL [CELL ...]
    python results/omniglot-studies/tables.py results/omniglot-studies/test --pairs BASE:OTHER [...]

reads ``DIR/CELL_sSEED.json`` (written by ``run.py``) and prints a Markdown table: per cell R@1,
MAP@R, their mean ± sd over the seeds, the difference to ``REFERENCE`` paired by seed (mean ± sd of
the per-seed differences, the seeds where the cell is higher), the mean seconds per epoch after the first (``history.jsonl``;
with the pool-refresh seconds where logged) and the mean training seconds of the whole run
(``train_seconds``: every epoch, refreshes and callbacks included). ``--pairs`` prints one row per
``BASE:OTHER`` pair (e.g. a loss without and with DReg), differences paired by seed.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path


def load(folder: Path) -> dict[str, dict[int, dict]]:
    cells: dict[str, dict[int, dict]] = {}
    for path in sorted(folder.glob("*_s*.json")):
        match = re.fullmatch(r"(.+)_s(\d+)", path.stem)
        if match:
            cells.setdefault(match[1], {})[int(match[2])] = json.loads(path.read_text())
    return cells


def mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def row(name: str, runs: dict[int, dict], ref: dict[int, dict]) -> str:
    r1 = [100 * r["recall@1"] for r in runs.values()]
    mapr = [100 * r["map@r"] for r in runs.values()]
    paired = sorted(set(runs) & set(ref))
    d1 = [100 * (runs[s]["recall@1"] - ref[s]["recall@1"]) for s in paired]
    dm = [100 * (runs[s]["map@r"] - ref[s]["map@r"]) for s in paired]
    wins = sum(d > 0 for d in d1)
    epoch_s = [statistics.mean(x for x in r["epoch_seconds"][1:] if x) for r in runs.values() if len(r["epoch_seconds"]) > 1]
    refresh = [sum(r["pool_refresh_s"]) / max(1, len(r["epoch_seconds"])) for r in runs.values() if r.get("pool_refresh_s")]
    cost = f"{statistics.mean(epoch_s):.1f}" if epoch_s else "–"
    if refresh:
        cost += f" ({statistics.mean(refresh):.2f} refresh)"
    train_s = [r["train_seconds"] for r in runs.values() if "train_seconds" in r]
    total = f"{statistics.mean(train_s):.0f}" if train_s else "–"
    seeds = ",".join(str(s) for s in sorted(runs))
    return (f"| {name} | {seeds} | {mean_sd(r1)} | {mean_sd(mapr)} | {mean_sd(d1)} | {wins}/{len(paired)} "
            f"| {mean_sd(dm)} | {cost} | {total} |")


def pair_row(cells: dict[str, dict[int, dict]], base: str, other: str) -> str:
    """``other`` against ``base`` paired by seed: both means, the paired differences, both training times."""
    a, b = cells[base], cells[other]
    seeds = sorted(set(a) & set(b))
    r1 = [[100 * c[s]["recall@1"] for s in seeds] for c in (a, b)]
    mapr = [[100 * c[s]["map@r"] for s in seeds] for c in (a, b)]
    d1 = [y - x for x, y in zip(*r1)]
    dm = [y - x for x, y in zip(*mapr)]
    secs = [statistics.mean(c[s]["train_seconds"] for s in seeds) for c in (a, b)]
    return (f"| {base} → {other} | {len(seeds)} | {mean_sd(r1[0])} | {mean_sd(r1[1])} | {mean_sd(d1)} "
            f"| {sum(d > 0 for d in d1)}/{len(seeds)} | {mean_sd(mapr[0])} | {mean_sd(mapr[1])} | {mean_sd(dm)} "
            f"| {secs[0]:.0f} → {secs[1]:.0f} |")


def main(argv: list[str]) -> int:
    if len(argv) > 1 and argv[1] == "--pairs":  # tables.py DIR --pairs BASE:OTHER ...
        cells = load(Path(argv[0]))
        print("| cells | seeds | R@1 base | R@1 other | ΔR@1 (paired) | higher | MAP@R base | MAP@R other "
              "| ΔMAP@R (paired) | train s |")
        print("|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        for pair in argv[2:]:
            print(pair_row(cells, *pair.split(":")))
        return 0
    folder, reference, names = Path(argv[0]), argv[1], argv[2:] or None
    cells = load(folder)
    if reference not in cells:
        raise SystemExit(f"no runs of the reference cell {reference!r} in {folder}")
    print("| cell | seeds | R@1 | MAP@R | ΔR@1 (paired) | higher | ΔMAP@R (paired) | s/epoch | train s |")
    print("|:--|:--|--:|--:|--:|--:|--:|--:|--:|")
    for name in names or sorted(cells):
        if name in cells:
            print(row(name, cells[name], cells[reference]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
