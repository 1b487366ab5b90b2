"""Table of the probe files (``p_NAME.jsonl`` from probe.py): final metrics and the last epoch's head probe.

    python results/omniglot-head-lr/summarize.py DIR [NAME ...]
"""
import json
import sys
from pathlib import Path


def row(path):
    lines = [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
    final = next((l for l in lines if l.get("final")), None)
    epochs = [l for l in lines if "epoch" in l and not l.get("final")]
    last = epochs[-1] if epochs else {}
    return final, last


def fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def main():
    d = Path(sys.argv[1])
    names = sys.argv[2:] or sorted(p.stem[2:] for p in d.glob("p_*.jsonl"))
    print("| run | R@1 | MAP@R | R(Z1) | R(Z2) | max abs s (1/2) | mean abs s (1) | rel. change (1) | mean norm y (1/2) | norm dDML1/dz | train s |")
    print("|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for n in names:
        p = d / f"p_{n}.jsonl"
        if not p.exists():
            continue
        final, last = row(p)
        if final is None:
            continue
        r1, mapr = 100 * final["recall@1"], 100 * final["map@r"]
        print(f"| {n} | {r1:.2f} | {mapr:.2f} | {fmt(last.get('R_min'))} | {fmt(last.get('R_max'))} | "
              f"{fmt(last.get('max_s_min'))} / {fmt(last.get('max_s_max'))} | "
              f"{fmt(last.get('mean_abs_s_min'), 3)} | {fmt(last.get('rel_change_min'), 3)} | "
              f"{fmt(last.get('y_norm_min'), 3 if (last.get('y_norm_min') or 0) < 1e3 else 0)} / "
              f"{fmt(last.get('y_norm_max'), 3 if (last.get('y_norm_max') or 0) < 1e3 else 0)} | "
              f"{fmt(last.get('grad_z_min'), 3)} | {final.get('train_seconds', 0):.0f} |")


if __name__ == "__main__":
    main()
