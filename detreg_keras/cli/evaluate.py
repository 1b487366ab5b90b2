"""Evaluate a saved DReg model: retrieval metrics on a dataset's test classes.

    python scripts/evaluate.py runs/omniglot-realnvp-20250101-120000            # a run folder: its model.keras, its data
    python scripts/evaluate.py runs/my-run --checkpoint best --output-dir eval/   # the best-on-validation model
    python scripts/evaluate.py model.keras --dataset omniglot --ks 1 2 4 8
    python scripts/evaluate.py model.keras --dataset folder --test-dir my/test_classes
    python scripts/evaluate.py model.keras --dataset inshop --data-root /data/inshop --ks 1 10 20 30 40 50

Writes ``metrics.json`` (Recall@k, MAP@R, R-Precision, Precision@1, NMI) and
``recall_at_k.png`` into ``--output-dir``, by default the model's folder;
``--embedding-map`` also writes the test split's TensorBoard projector files
(``projector/``: ``tensorboard --logdir OUT/projector``) and a t-SNE map
(``embedding_map.png``).
Existing files are never overwritten without ``--overwrite``. Note that a
run folder of ``scripts/train.py`` already holds the ``metrics.json`` of its
final test evaluation: evaluating it again needs ``--output-dir`` (or
``--overwrite``, which recomputes the same numbers for ``model.keras``).

Dataset and preprocessing come from the run's ``config.json`` when the model
sits in a run folder, otherwise from the preset of ``--dataset`` (image size
and channels from the model's input); any flag overrides them. With
``--dataset folder``, ``--test-dir`` alone evaluates those classes (no training
folder needed); ``--train-dir`` alone evaluates the second half of its classes.

Exit status: 0 evaluated; 1 an expected failure (missing or damaged model,
missing or empty data, existing outputs), reported in one ``error:`` line;
2 bad command-line arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import keras

import detreg_keras  # noqa: F401  (registers the custom objects for load_model)
from detreg_keras.data import load_image_folder
from detreg_keras.evaluation import plot_recall_at_k
from detreg_keras.metrics import METRIC_ALIASES, METRIC_NAMES
from detreg_keras.model import load_model
from detreg_keras.training import (
    DATASETS,
    PRESETS,
    DataSplits,
    TrainConfig,
    evaluate_splits,
    load_run_config,
    load_splits,
    resolve_config,
    resolve_data_path,
    write_embedding_map,
)

CHECKPOINTS = {"model": "model.keras", "best": "best.keras", "checkpoint": "checkpoint.keras"}
OUTPUTS = ("metrics.json", "recall_at_k.png")
MAP_OUTPUTS = ("embedding_map.png", "projector")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS
    )
    p.add_argument("model", metavar="MODEL_OR_RUN_DIR", help="a .keras model file or a run folder")
    p.add_argument("--checkpoint", choices=sorted(CHECKPOINTS), default="model",
                   help="which model of a run folder: model.keras (default), best.keras, checkpoint.keras")
    p.add_argument("--dataset", choices=sorted(DATASETS), help="default: the run's dataset")
    p.add_argument("--data-root", help="omniglot: folder of the zips; inshop: dataset folder")
    p.add_argument("--data-dir", help="tfds data directory (cub200, cars196, sop)")
    p.add_argument("--train-dir", help="folder dataset without --test-dir: the second half of its classes is evaluated")
    p.add_argument("--test-dir", help="folder dataset: the classes to evaluate")
    p.add_argument("--class-depth", type=int)
    p.add_argument("--ks", type=int, nargs="+", help="Recall@k values")
    p.add_argument("--metrics", nargs="+", choices=[*METRIC_NAMES, *METRIC_ALIASES])
    p.add_argument("--image-size", type=int, help="default: the model's input size")
    p.add_argument("--channels", type=int, choices=(1, 3), help="default: the model's input channels")
    p.add_argument("--eval-mode", choices=("center_crop", "resize"))
    p.add_argument("--resize-size", type=int)
    p.add_argument("--batch-size", dest="eval_batch_size", type=int)
    p.add_argument("--output-dir", default=None, help="default: the model's folder")
    p.add_argument("--embedding-map", action="store_true",
                   help="also write projector/ (TensorBoard Embedding Projector) and embedding_map.png (t-SNE)")
    p.add_argument("--overwrite", action="store_true", default=False, help="replace existing metrics.json / PNG")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1)
    return p


def _model_path(target: Path, checkpoint: str) -> Path:
    if target.is_dir():
        path = target / CHECKPOINTS[checkpoint]
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (is {target} a finished run folder?).")
        return path
    if not target.is_file():
        raise FileNotFoundError(f"{target} not found.")
    return target


def _config(model_path: Path, model: keras.Model, given: dict) -> TrainConfig:
    """The run's config (if any) or the dataset's preset, the model's input shape, then the flags."""
    run_config = model_path.parent / "config.json"
    if run_config.is_file():
        cfg = load_run_config(model_path.parent)
        base = {k: v for k, v in cfg.to_dict().items() if k != "preset"}
        preset = cfg.preset
    else:
        if "dataset" not in given:
            raise ValueError(f"{model_path} is not in a run folder: give --dataset.")
        preset = given["dataset"] if given["dataset"] in PRESETS else "digits"
        base = {}
    _, height, _, channels = getattr(model, "backbone", model).input_shape
    if height is not None:
        base.update(image_size=int(height), channels=int(channels))
    # Evaluate the test classes, whatever validation the run used.
    base.update(val_classes=0, evaluate_on="test", verbose=given.get("verbose", 1), embedding_map=False)
    return resolve_config(preset, **{**base, **given})


def _load_eval_splits(cfg: TrainConfig) -> DataSplits:
    """The splits to evaluate; a folder dataset with only ``--test-dir`` needs no training folder."""
    if cfg.dataset == "folder" and cfg.test_dir and not cfg.train_dir:
        test = load_image_folder(resolve_data_path(cfg.test_dir), class_depth=cfg.class_depth)
        return DataSplits(train=test, test=test)  # evaluate_splits reads only the test split
    splits, _ = load_splits(cfg)
    return splits


def _evaluate(target: Path, checkpoint: str, output_dir: str | None, overwrite: bool, given: dict) -> int:
    model_path = _model_path(target, checkpoint)
    out = Path(output_dir) if output_dir else model_path.parent
    outputs = OUTPUTS + (MAP_OUTPUTS if given.get("embedding_map") else ())
    existing = [str(out / name) for name in outputs if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} already exist(s); pass --overwrite or choose another --output-dir."
        )
    model = load_model(model_path, compile=False)
    cfg = _config(model_path, model, given)
    start = time.perf_counter()
    splits = _load_eval_splits(cfg)
    metrics = evaluate_splits(model, splits, cfg)
    report = {
        **metrics,
        "model": str(model_path),
        "dataset": cfg.dataset,
        "ks": [int(k) for k in cfg.ks],
        "eval_seconds": time.perf_counter() - start,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    plot_recall_at_k({model_path.name: metrics}, out / "recall_at_k.png", title=f"{cfg.dataset}: Recall@k")
    shown = "  ".join(f"R@{k}={100 * metrics[f'recall@{k}']:.2f}" for k in cfg.ks if f"recall@{k}" in metrics)
    extra = "  ".join(f"{n}={100 * metrics[k]:.2f}" for k, n in (("map@r", "MAP@R"), ("nmi", "NMI")) if k in metrics)
    print(f"{model_path} on {cfg.dataset} (test classes): {shown}  {extra}".rstrip())
    print(f"wrote {out / 'metrics.json'} and {out / 'recall_at_k.png'}")
    if cfg.embedding_map:
        written = write_embedding_map(model, splits.test, cfg, out)
        print(f"wrote {written['projector']} and {written['png']} ({written['points']} images, "
              f"{written['seconds']:.1f}s)")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    target = Path(given.pop("model"))
    checkpoint = given.pop("checkpoint")
    output_dir = given.pop("output_dir")
    overwrite = given.pop("overwrite")
    try:
        return _evaluate(target, checkpoint, output_dir, overwrite, given)
    except (FileNotFoundError, NotADirectoryError, FileExistsError, ValueError) as err:
        message = " ".join(str(err).split())  # one line
        print(f"error: {message}", file=sys.stderr)
        return 1

