#!/usr/bin/env python
"""Local Lipschitz report: compare saved models at data points and between them.

The paper's thesis (Sec. 2-4): DML raises the local Lipschitz constant of the
learned map between samples of the same class, and the determinant
regulariser lowers it. For each saved model this script measures, with
:mod:`detreg_keras.diagnostics`, the spectral norm of the Jacobian of the
embedding

* w.r.t. the backbone feature ``z`` (``head``) and w.r.t. the raw-pixel input
  (``network``),
* at the data points (``data``), on segments to the nearest same-class
  neighbour (``same``) and to the nearest different-class neighbour
  (``different``), plus the secant ratio of those pairs (Eq. 2),

on a class-balanced sample of the train and/or test split (the same images
for every model)::

    python scripts/lipschitz_report.py runs/dreg/model.keras runs/pa/model.keras \\
        --names dreg pa --dataset digits --num-samples 300 --output-dir runs/lipschitz

writes ``lipschitz.csv`` (one row per model, split, target and location),
``lipschitz.md`` (summary tables) and ``lipschitz.png`` (overlaid histograms)
in ``--output-dir``, and refuses to replace them without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

OUTPUTS = ("lipschitz.csv", "lipschitz.md", "lipschitz.png")
COLUMNS = ("model", "split", "target", "location", "n", "mean", "median", "p90", "max")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="saved .keras models")
    p.add_argument("--names", nargs="+", default=None, help="one name per model (default: file stems)")
    p.add_argument("--dataset", choices=("digits", "omniglot"), default="digits")
    p.add_argument("--split", nargs="+", choices=("train", "test"), default=["train", "test"],
                   help="splits whose points are profiled (default: both)")
    p.add_argument("--num-samples", type=int, default=200, help="images per split (class-balanced sample)")
    p.add_argument("--per-class", type=int, default=None,
                   help="images per class in the sample (default: num-samples / classes, at least 2)")
    p.add_argument("--t", type=float, nargs="+", default=[0.5], help="interpolation fractions on the segments")
    p.add_argument("--num-iters", type=int, default=20, help="power iterations")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="sample and start-vector seed")
    p.add_argument("--data-root", default=None, help="folder of the Omniglot zips (default ../shared/data/omniglot)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace existing report files")
    args = p.parse_args(argv)
    names = args.names or [Path(m).stem if Path(m).stem != "model" else Path(m).parent.name for m in args.models]
    if len(names) != len(args.models):
        p.error(f"--names gives {len(names)} names for {len(args.models)} models.")
    if len(set(names)) != len(names):
        p.error(f"model names must be unique, got {names} (pass --names).")
    if args.num_samples < 2:
        p.error("--num-samples must be >= 2.")
    args.names = names
    return args


# ----------------------------------------------------------------------------- data
def balanced_subset(labels: np.ndarray, n: int, per_class: int | None, seed: int) -> np.ndarray:
    """Indices of ``n`` samples, ``per_class`` from each of randomly chosen classes (sorted)."""
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))
    per_class = per_class or max(2, -(-n // len(classes)))
    chosen: list[int] = []
    for c in classes:
        chosen.extend(rng.permutation(np.flatnonzero(labels == c))[:per_class].tolist())
        if len(chosen) >= n:
            break
    return np.sort(np.asarray(chosen[:n], dtype=np.int64))


def fit_images(images: np.ndarray, shape: tuple) -> np.ndarray:
    """Resize / convert channels (RGB -> gray by the mean, as training does) to a model's input."""
    import tensorflow as tf  # noqa: PLC0415

    _, height, width, channels = shape
    if height is not None and width is not None and images.shape[1:3] != (height, width):
        images = tf.clip_by_value(tf.image.resize(images, (height, width), antialias=True), 0.0, 255.0).numpy()
    if channels == 1 and images.shape[-1] == 3:
        images = images.mean(axis=-1, keepdims=True)
    elif channels == 3 and images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images.astype(np.float32)


def load_split(args: argparse.Namespace, split: str, input_shapes: set[tuple]):
    """``{input_shape: images}``, labels of a class-balanced sample of ``split``."""
    if args.dataset == "digits":
        from detreg_keras.data import load_digits_split  # noqa: PLC0415

        (x_train, y_train), (x_test, y_test) = load_digits_split()
        x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
        idx = balanced_subset(y, args.num_samples, args.per_class, args.seed)
        return {shape: fit_images(x[idx], shape) for shape in input_shapes}, y[idx]

    from detreg_keras.data import load_omniglot, make_eval_dataset  # noqa: PLC0415
    from detreg_keras.data.folders import DEFAULT_OMNIGLOT_ROOT  # noqa: PLC0415

    root = Path(args.data_root or DEFAULT_OMNIGLOT_ROOT)
    if not root.is_absolute() and not root.exists():
        root = Path(__file__).resolve().parents[1] / root
    records = load_omniglot(root, split)
    records = records.subset(balanced_subset(records.labels, args.num_samples, args.per_class, args.seed))
    out, labels = {}, None
    for shape in input_shapes:
        size = (shape[1], shape[2]) if shape[1] is not None else 105
        batches = list(make_eval_dataset(records, batch_size=256, image_size=size, mode="resize"))
        out[shape] = fit_images(np.concatenate([b[0].numpy() for b in batches]), shape)
        labels = np.concatenate([b[1].numpy() for b in batches])
    return out, labels


# ----------------------------------------------------------------------------- report
def _fmt(value) -> str:
    if isinstance(value, int):
        return str(value)
    return "nan" if not np.isfinite(value) else f"{value:.4g}"


def write_markdown(path: Path, rows: list[dict], args: argparse.Namespace) -> None:
    lines = [
        "# Local Lipschitz constants",
        "",
        f"Dataset `{args.dataset}`, {args.num_samples} images per split (class-balanced, seed {args.seed}), "
        f"interpolation t = {', '.join(f'{t:g}' for t in args.t)}, {args.num_iters} power iterations.",
        "",
        "Spectral norm of the Jacobian of the L2-normalised embedding, per point: `head` w.r.t. the backbone "
        "feature z, `network` w.r.t. the raw-pixel input. Locations: `data` (the samples), `same` / `different` "
        "(points on the segment to the nearest same- / different-class neighbour, chosen by cosine similarity "
        "of z; images are interpolated in pixel space), `*_secant` (||f(a) - f(b)|| / ||a - b|| of those pairs, "
        "paper Eq. 2, a lower bound of the largest local constant on the segment). The paper's claim: DML "
        "raises the constant between same-class samples, the determinant regulariser lowers it.",
        "",
        "## Medians",
        "",
    ]
    locations = list(dict.fromkeys(r["location"] for r in rows))
    lines.append("| model | split | target | " + " | ".join(locations) + " |")
    lines.append("|---|---|---|" + "---:|" * len(locations))
    groups = list(dict.fromkeys((r["model"], r["split"], r["target"]) for r in rows))
    for group in groups:
        by_loc = {r["location"]: r for r in rows if (r["model"], r["split"], r["target"]) == group}
        cells = [_fmt(by_loc[loc]["median"]) if loc in by_loc else "" for loc in locations]
        lines.append("| " + " | ".join(group) + " | " + " | ".join(cells) + " |")
    lines += ["", "## All statistics", "", "| " + " | ".join(COLUMNS) + " |", "|---|---|---|---|" + "---:|" * 5]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]) if c in ("n", "mean", "median", "p90", "max") else str(r[c])
                                       for c in COLUMNS) + " |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.output_dir)
    existing = [str(out_dir / name) for name in OUTPUTS if (out_dir / name).exists()]
    if existing and not args.overwrite:
        print(f"error: {', '.join(existing)} already exist(s); pass --overwrite to replace.", file=sys.stderr)
        return 1
    for path in args.models:
        if not Path(path).is_file():
            print(f"error: model file not found: {path}", file=sys.stderr)
            return 1

    import keras  # noqa: PLC0415

    import detreg_keras  # noqa: F401,PLC0415  (registers the custom objects)
    from detreg_keras.diagnostics import lipschitz_profile, plot_histograms, summarize  # noqa: PLC0415

    models = {name: keras.models.load_model(path, compile=False) for name, path in zip(args.names, args.models)}
    shapes = {name: tuple(m.backbone.input_shape) for name, m in models.items()}
    profiles, rows = {}, []
    for split in args.split:
        images, labels = load_split(args, split, set(shapes.values()))
        print(f"{split}: {len(labels)} images, {len(np.unique(labels))} classes")
        for name, model in models.items():
            start = time.perf_counter()
            profile = lipschitz_profile(
                model, images[shapes[name]], labels, t=args.t, num_iters=args.num_iters, seed=args.seed,
                batch_size=args.batch_size,
            )
            profiles[f"{name}/{split}"] = profile
            for row in summarize({name: profile}):
                rows.append({"model": name, "split": split, **{k: v for k, v in row.items() if k != "profile"}})
            print(f"  {name}: {time.perf_counter() - start:.1f}s")

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "lipschitz.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    write_markdown(out_dir / "lipschitz.md", rows, args)
    plot_histograms(profiles, out_dir / "lipschitz.png")
    print((out_dir / "lipschitz.md").read_text())
    print(f"wrote {', '.join(str(out_dir / n) for n in OUTPUTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
