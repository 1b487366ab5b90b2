"""Train a DReg model and report retrieval metrics on held-out classes.

With no arguments: the omniglot preset on the Omniglot alphabets embedded in
the package (train on 136 characters of 5 alphabets, retrieve among the 106
characters of 3 unseen alphabets), then one table on the unseen alphabets:
raw-pixel kNN, the untrained network and DReg (about 2-3 minutes on 2 CPU cores).

    python scripts/train.py
    python scripts/train.py --compare                   # also plain Proxy Anchor, same seed and budget
    python scripts/train.py --flow none                 # plain Proxy Anchor only
    python scripts/train.py --preset digits             # fast smoke test (sklearn digits 0-4 / 5-9; easy)
    python scripts/train.py --data-root ../shared/data/omniglot   # the same benchmark from the small zips
    python scripts/train.py --data-dir ~/omniglot       # full Omniglot: images_background/evaluation.zip
    python scripts/train.py --preset cub200 --data-dir ~/tensorflow_datasets
    python scripts/train.py --preset inshop --data-root /data/inshop
    python scripts/train.py --preset cub200 --dataset folder --train-dir my/train --test-dir my/test
    python scripts/train.py --preset omniglot --val-classes 30   # keep the best epoch on validation classes
    python scripts/train.py --resume runs/omniglot-realnvp-20250101-120000   # continue an interrupted run

A preset sets every field of the recipe (see detreg_keras.training.PRESETS);
any flag given on the command line overrides the preset's value. The paper's
presets (cub200, cars196, sop, inshop) use ImageNet weights for the backbone:
on an offline machine put the weight file in ~/.keras/models, pass its path
with --backbone-weights, or train from scratch with --backbone-weights none.

The run folder (--output-dir/--run-name) gets config.json, history.jsonl,
TensorBoard logs (logs/), a checkpoint of the training state after every
epoch (backup/, BackupAndRestore), optionally the full model every N epochs
(checkpoint.keras, --checkpoint-every N), then model.keras, metrics.json and
recall_at_k.png (every row of the table); it is never overwritten. --resume RUN_DIR
continues an interrupted run in place from its last finished epoch, with the
run's saved config.json (only --verbose may be given with it).

Model selection: with --val-classes N, N training classes are held out and
the model with the best validation Recall@1 is kept as best.keras (its test
metrics go into metrics.json under "best_checkpoint"). The DReg and Proxy
Anchor papers report the best epoch chosen on the *test* classes, which is
optimistic; this script never looks at the test classes during training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import NamedTuple

from detreg_keras.metrics import METRIC_ALIASES, METRIC_NAMES
from detreg_keras.training import (
    DATASETS,
    DEFAULT_PRESET,
    PRESETS,
    TrainConfig,
    check_paths,
    format_table,
    load_run_config,
    method_label,
    resolve_config,
    run_training,
)
from detreg_keras.training.config import SAMPLERS


class Command(NamedTuple):
    """What the command line asks for."""

    cfg: TrainConfig
    resume: str | None
    compare: bool
    baselines: bool


def _optional_str(value: str) -> str | None:
    return None if value.lower() in ("none", "null", "") else value


def _optional_float(value: str) -> float | None:
    return None if value.lower() in ("none", "null", "") else float(value)


def _json_object(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"memory_size\": 1024}}', got {value!r}")
    return parsed


def build_parser() -> argparse.ArgumentParser:
    """The CLI; every flag but --preset/--resume defaults to 'not given' so a preset can fill it."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                   help=f"recipe to start from (default: {DEFAULT_PRESET})")
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue an interrupted run in place")
    p.add_argument("--compare", action="store_true", default=False,
                   help="also train plain Proxy Anchor (--flow none) with the same seed and budget")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate raw-pixel kNN and the untrained network (default: on)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=sorted(DATASETS), help="default: the preset's dataset")
    g.add_argument("--data-root", help="omniglot: folder of the small zips (default: the embedded copy); inshop: dataset folder")
    g.add_argument("--data-dir", help="tfds data directory (cub200, cars196, sop); omniglot: folder of the full dataset's zips")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, help="let tfds download and prepare the dataset")
    g.add_argument("--train-dir", help="folder dataset: one sub-folder per class")
    g.add_argument("--test-dir", help="folder dataset: test classes (default: second half of --train-dir's classes)")
    g.add_argument("--class-depth", type=int, help="folder dataset: folder levels that name a class (default 1)")
    g.add_argument("--val-classes", type=int, help="hold out N training classes for validation / best checkpoint")
    g.add_argument("--val-seed", type=int, help="seed of the validation classes' draw (default 0)")
    g.add_argument("--evaluate-on", choices=("test", "val"),
                   help="'val': report metrics on the --val-classes instead of the test classes (for tuning)")
    g.add_argument("--subset-classes", type=int, help="use only the first N train and test classes (smoke tests)")

    g = p.add_argument_group("input pipeline")
    g.add_argument("--image-size", type=int)
    g.add_argument("--channels", type=int, choices=(1, 3))
    g.add_argument("--sampler", choices=SAMPLERS,
                   help="batch sampler: random, m_per_class (P classes x m), spc_r (random + one same-class pair), "
                        "or the embedded samplers greedy_coreset, ddm, frd (Roth et al. 2020: batches chosen "
                        "from the current embeddings of the training images)")
    g.add_argument("--samples-per-class", type=int, help="m of m_per_class and embedded-sampler batches (batch = P x m)")
    g.add_argument("--sampler-refresh-epochs", type=int,
                   help="embedded samplers: re-embed the training images every N epochs (default 1)")
    g.add_argument("--sampler-candidates", type=int, help="ddm / frd: random candidate batches per batch (default 30)")
    g.add_argument("--crop-scale-min", type=float, help="RandomResizedCrop area range (min, 1)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flips")
    g.add_argument("--eval-mode", choices=("center_crop", "resize"))
    g.add_argument("--resize-size", type=int, help="shorter side before the evaluation centre crop")

    g = p.add_argument_group("model")
    g.add_argument("--backbone")
    g.add_argument("--backbone-weights", type=_optional_str, help="'imagenet', 'none' or a weights file")
    g.add_argument("--cnn-widths", type=int, nargs="+", help="small_cnn: conv widths of its blocks (default 32 64 128)")
    g.add_argument("--embedding-dim", type=int)
    g.add_argument("--flow", choices=("realnvp", "nice", "none"), help="'none': plain Proxy Anchor baseline")
    g.add_argument("--num-couplings", type=int)
    g.add_argument("--hidden-units", type=int)
    g.add_argument("--dueling", action=argparse.BooleanOptionalAction, help="--no-dueling: single flow head, min term only")
    g.add_argument("--lambda-min", type=float)
    g.add_argument("--lambda-max", type=float)
    g.add_argument("--epsilon", type=float)
    g.add_argument("--regularizer-form", choices=("log1p", "logdet"))
    g.add_argument("--loss")
    g.add_argument("--loss-config", type=_json_object, metavar="JSON",
                   help='the loss\' arguments as a JSON object, e.g. --loss xbm --loss-config \'{"loss": "contrastive", "memory_size": 2048}\'')
    g.add_argument("--log-scale-bound", type=float, help="bound b of the coupling log-scales, s = b·tanh(ŝ/b) (default 0.1)")
    g.add_argument("--coupling-reduction", choices=("sum", "mean"), help="R over the K couplings (default sum)")
    g.add_argument("--shift-bound", type=_optional_float, help="bound b of the coupling shifts, b·tanh(t/b) (default 0.1; 'none': unbounded)")
    g.add_argument("--head-input-norm", choices=("none", "l2"), help="'l2' (default): the flow heads see sqrt(d)·z/|z|; 'none': they see z")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--learning-rate", type=float, help="backbone learning rate")
    g.add_argument("--head-lr-multiplier", type=float)
    g.add_argument("--proxy-lr-multiplier", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-epochs", type=int, help="epochs with a frozen backbone")
    g.add_argument("--head-warmup-epochs", type=float, help="the flow heads' lr ramps up linearly over these epochs")
    g.add_argument("--clipvalue", type=_optional_float, help="clip gradients by value at C ('none': no clipping)")
    g.add_argument("--seed", type=int)

    g = p.add_argument_group("evaluation and output")
    g.add_argument("--ks", type=int, nargs="+", help=f"Recall@k values (digits default: {list(d.ks)})")
    g.add_argument("--metrics", nargs="+", choices=[*METRIC_NAMES, *METRIC_ALIASES])
    g.add_argument("--eval-every", type=int, help="validate every N epochs (with --val-classes)")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--output-dir", help=f"default: {d.output_dir}")
    g.add_argument("--run-name")
    g.add_argument("--checkpoint-every", type=int, help="also save the full model as checkpoint.keras every N epochs (0: off)")
    g.add_argument("--verbose", type=int, choices=(0, 1, 2), help="0 silent, 1 progress bars, 2 one line per epoch")
    g.add_argument("--embedding-map", action=argparse.BooleanOptionalAction,
                   help="also write the test split's TensorBoard projector files (projector/) and a t-SNE "
                        "embedding_map.png (t-SNE: about a minute for Omniglot's 2,120 images)")
    return p


def parse_args(argv: list[str] | None = None) -> Command:
    """The :class:`Command` of a command line."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    preset, resume, compare, baselines = (args.pop(k) for k in ("preset", "resume", "compare", "baselines"))
    if compare and resume is not None:
        parser.error("--compare starts new runs; resume each run folder on its own.")
    if resume is not None:
        extra = sorted(set(args) - {"verbose"})
        if extra:
            parser.error(f"--resume uses the run's config.json; drop {', '.join('--' + e.replace('_', '-') for e in extra)}.")
        try:
            cfg = load_run_config(resume)
        except FileNotFoundError as err:
            parser.error(str(err))
        if "verbose" in args:
            cfg.verbose = args["verbose"]
        return Command(cfg, resume, False, baselines)
    cfg = resolve_config(preset, **args)
    try:
        check_paths(cfg)
    except ValueError as err:
        parser.error(str(err))
    if compare and cfg.flow == "none":
        parser.error("--compare trains Proxy Anchor beside DReg; drop --flow none.")
    return Command(cfg, None, compare, baselines)


#: What the main job's table is measured on, per dataset.
_EVALUATED_ON = {
    "omniglot": "unseen alphabets",
    "digits": "unseen digits 5-9 (sklearn 8x8 digits: an easy smoke test)",
}


def _proxy_anchor_config(cfg: TrainConfig) -> TrainConfig:
    """The --compare run: the same recipe, seed and budget without the flow heads."""
    name = None if cfg.run_name is None else f"{cfg.run_name}-proxy-anchor"
    return dataclasses.replace(cfg, flow="none", run_name=name)


def main(argv: list[str] | None = None) -> int:
    """Runs the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    command = parse_args(argv)
    cfg = command.cfg
    references: dict[str, dict] = {}
    if command.compare:
        print(f"[1/2] {method_label(_proxy_anchor_config(cfg))}", flush=True)
        compared = run_training(_proxy_anchor_config(cfg))
        references["Proxy Anchor"] = compared["metrics"]
        print(f"[2/2] {method_label(cfg)}", flush=True)
    result = run_training(cfg, resume=command.resume, baselines=command.baselines, references=references)
    metrics = result["metrics"]
    rows = {**metrics.get("baselines", {}), **references, method_label(cfg): metrics}
    if "best_checkpoint" in metrics:
        rows[f"{method_label(cfg)}, best validation epoch {metrics['best_checkpoint']['epoch']}"] = metrics["best_checkpoint"]
    where = "validation classes" if cfg.evaluate_on == "val" else _EVALUATED_ON.get(cfg.dataset, "unseen classes")
    print(f"\n{cfg.dataset}: retrieval on the {where}, {metrics['epochs']} epochs (%)")
    print(format_table(rows, cfg.ks))
    print(f"\nrun folder: {result['run_dir']}")
    if command.compare:
        print(f"Proxy Anchor run folder: {compared['run_dir']}")
    return 0

