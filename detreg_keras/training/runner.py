"""The main job: :func:`run_training` trains, evaluates retrieval and writes the run folder.

Resuming: a run interrupted at any point (an exception, Ctrl-C, a killed
process) continues with ``run_training(cfg, resume=run_dir)`` or
``scripts/train.py --resume RUN_DIR``: the weights, the optimizer state (the
learning-rate schedule follows ``optimizer.iterations``) and the epoch counter
come back from ``backup/``, the data pipelines skip the epochs already seen
(so the batches of epoch ``e`` are the ones an uninterrupted run would see),
and the best validation score so far is read back from ``history.jsonl``. A run
interrupted after its last epoch only redoes the final evaluation.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras

from detreg_keras.data import DecodeStats
from detreg_keras.data.registry import DataSplits, Source, load_splits, source_class_names, source_labels
from detreg_keras.evaluation import RetrievalEvaluation, plot_recall_at_k
from detreg_keras.training.build import build_model, make_run_optimizer
from detreg_keras.training.callbacks import HistoryLog, PeriodicCheckpoint
from detreg_keras.training.config import TrainConfig, check_config
from detreg_keras.training.inputs import (
    describe,
    make_evaluation_data,
    make_training_inputs,
    report_dropped,
    skip_epochs,
)
from detreg_keras.training.reporting import (
    baseline_metrics,
    evaluate_splits,
    method_label,
    write_embedding_map,
)
from detreg_keras.training.runfolder import (
    backup_epoch,
    history_by_key,
    load_run_config,
    new_run_dir,
    read_history,
)

Rows = dict[str, dict[str, Any]]


def run_training(
    cfg: TrainConfig,
    *,
    resume: str | os.PathLike | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    baselines: bool = False,
    references: Rows | None = None,
) -> dict[str, Any]:
    """Train, evaluate retrieval on the held-out classes and write the run folder.

    Args:
        cfg: the run's configuration (with ``resume``: the one saved in
            ``resume/config.json``, see :func:`load_run_config`).
        resume: an interrupted run folder to continue in place.
        callbacks: extra Keras callbacks for ``fit`` (run before the run
            folder's own callbacks).
        baselines: also evaluate :func:`baseline_metrics` before training
            (saved in ``baselines.json``, which a resumed run reads back).
        references: metrics of other runs to draw in this run's plot (e.g.
            ``{"Proxy Anchor": metrics}``), in front of this run's curve.

    Returns:
        ``{"run_dir": str, "metrics": {...}, "history": {key: [per epoch]}}``;
        the history covers every epoch of the run, resumed or not; with
        ``baselines``, ``metrics["baselines"]`` holds the reference rows.

    Raises:
        FileExistsError: a new run's folder exists and is not empty.
        FileNotFoundError / ValueError: ``resume`` is not an unfinished run.
    """
    check_config(cfg)
    if resume is not None:
        _check_resumable(cfg, Path(resume))
    keras.utils.set_random_seed(cfg.seed)
    splits, validation = load_splits(cfg)
    train_labels = source_labels(splits.train)
    train_stats = DecodeStats()
    inputs = make_training_inputs(splits.train, cfg, train_labels, train_stats)
    train_ds, steps_per_epoch = inputs.dataset, inputs.steps_per_epoch
    if cfg.verbose:
        print(f"{method_label(cfg)} on {cfg.dataset}: training on {describe(splits.train, train_labels)}, "
              f"testing on {describe(splits.test)}", flush=True)  # fmt: skip
    run_dir = new_run_dir(cfg) if resume is None else Path(resume)

    model = build_model(cfg, num_classes=int(train_labels.max()) + 1, class_names=source_class_names(splits.train))
    model.build((None, cfg.image_size, cfg.image_size, cfg.channels))  # BackupAndRestore needs a built model
    model.compile(optimizer=make_run_optimizer(cfg, steps_per_epoch))
    reference_rows = _saved_baselines(model, splits, cfg, run_dir) if baselines else {}

    done = backup_epoch(run_dir / "backup") if resume is not None else 0
    if done:
        if inputs.reproducible:  # embedded samplers' batches depend on the embeddings: nothing to replay
            skip_epochs(train_ds, done)
        if cfg.verbose:
            print(f"Resuming {run_dir} after epoch {done}/{cfg.epochs}.")
    val_callback = _validation_callback(validation, cfg, run_dir, done)
    fit_callbacks = [
        *callbacks,
        *([val_callback] if val_callback else []),
        *_run_folder_callbacks(cfg, run_dir),
        *inputs.callbacks,  # after BackupAndRestore: a resumed run embeds its pool with the restored weights
        # last: its row of history.jsonl gets the keys the others log (pool_refresh_s) and their time
        HistoryLog(run_dir / "history.jsonl"),
    ]
    with warnings.catch_warnings():
        # Pipelines over records have no known length until their first epoch ends; Keras
        # then warns that the input "ran out of data", which is how such an epoch ends.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        model.fit(train_ds, epochs=cfg.epochs, verbose=cfg.verbose, callbacks=fit_callbacks, shuffle=False)
    report_dropped(train_stats, "training images (all epochs)")

    model.save(run_dir / "model.keras")
    metrics = _final_metrics(model, splits, cfg, run_dir, val_callback, {**reference_rows, **(references or {})})
    if reference_rows:
        metrics["baselines"] = reference_rows
    if cfg.embedding_map:
        metrics["embedding_map_seconds"] = write_embedding_map(model, splits.test, cfg, run_dir)["seconds"]
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(run_dir / "backup", ignore_errors=True)
    return {"run_dir": str(run_dir), "metrics": metrics, "history": history_by_key(read_history(run_dir))}


def _check_resumable(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuses to resume a finished run, or one whose saved config differs from ``cfg``."""
    saved = load_run_config(run_dir)
    if (run_dir / "metrics.json").exists():
        raise ValueError(f"{run_dir} is a finished run (metrics.json exists); nothing to resume.")
    if saved.to_dict() != {**cfg.to_dict(), "verbose": saved.verbose}:
        raise ValueError(f"cfg differs from {run_dir / 'config.json'}; resume with load_run_config(run_dir).")


def _saved_baselines(model: keras.Model, splits: DataSplits, cfg: TrainConfig, run_dir: Path) -> Rows:
    """:func:`baseline_metrics` of the untrained ``model``, or those a resumed run saved."""
    path = run_dir / "baselines.json"
    if path.is_file():
        return json.loads(path.read_text())
    rows = baseline_metrics(model, splits, cfg)
    path.write_text(json.dumps(rows, indent=2))
    return rows


def _validation_callback(
    validation: Source | None, cfg: TrainConfig, run_dir: Path, done: int
) -> RetrievalEvaluation | None:
    """Validation retrieval every ``eval_every`` epochs, keeping ``best.keras`` (``None`` without validation).

    A resumed run starts from the best validation Recall@1 of the epochs already done.
    """
    if validation is None:
        return None
    val_size = len(source_labels(validation))
    if val_size < 2:
        raise ValueError(f"The {cfg.val_classes} validation class(es) hold {val_size} image(s); retrieval needs 2+.")
    # Recall@k needs k < the validation set's size (each query leaves itself out).
    val_ks = tuple(k for k in cfg.ks if k < val_size) or (1,)
    val_data, _ = make_evaluation_data(validation, cfg)
    callback = RetrievalEvaluation(
        val_data,
        ks=val_ks,
        every_n_epochs=cfg.eval_every,
        filepath=run_dir / "best.keras",
        batch_size=cfg.eval_batch_size,
        verbose=1 if cfg.verbose else 0,
    )
    past = [row for row in read_history(run_dir) if row["epoch"] <= done and "val_recall@1" in row]
    if past:
        best = max(past, key=lambda row: row["val_recall@1"])
        callback.best, callback.best_epoch = best["val_recall@1"], best["epoch"] - 1
    return callback


def _run_folder_callbacks(cfg: TrainConfig, run_dir: Path) -> list[keras.callbacks.Callback]:
    """TensorBoard logs, checkpoint.keras and the backup/ of every epoch (history.jsonl comes last, in the runner)."""
    return [
        keras.callbacks.TensorBoard(log_dir=str(run_dir / "logs"), write_graph=False, profile_batch=0),
        PeriodicCheckpoint(run_dir / "checkpoint.keras", cfg.checkpoint_every),
        # Kept after the run until model.keras and metrics.json exist, so that an
        # interruption during the final evaluation does not restart training.
        keras.callbacks.BackupAndRestore(str(run_dir / "backup"), delete_checkpoint=False),
    ]


def _final_metrics(
    model: keras.Model,
    splits: DataSplits,
    cfg: TrainConfig,
    run_dir: Path,
    val_callback: RetrievalEvaluation | None,
    references: Rows,
) -> dict[str, Any]:
    """Test metrics of the final model (and of best.keras), the run's timings, and ``recall_at_k.png``.

    Args:
        references: rows drawn in the plot in front of this run's curves.
    """
    eval_start = time.perf_counter()
    label = method_label(cfg)
    metrics: dict[str, Any] = dict(evaluate_splits(model, splits, cfg))
    curves = {**references, label: metrics}
    if val_callback is not None and (run_dir / "best.keras").is_file():
        best_metrics = dict(evaluate_splits(keras.models.load_model(run_dir / "best.keras"), splits, cfg))
        best_metrics["epoch"] = None if val_callback.best_epoch is None else val_callback.best_epoch + 1
        best_metrics["val_recall@1"] = float(val_callback.best)
        metrics["best_checkpoint"] = best_metrics
        curves[f"{label}, best on validation"] = best_metrics
    history_rows = read_history(run_dir)
    metrics["epochs"] = len(history_rows)
    metrics["train_seconds"] = float(sum(row.get("epoch_seconds", 0.0) for row in history_rows))
    metrics["eval_seconds"] = time.perf_counter() - eval_start
    where = "validation classes" if cfg.evaluate_on == "val" else "unseen classes"
    plot_recall_at_k(curves, run_dir / "recall_at_k.png", title=f"{cfg.dataset}, {where}: Recall@k")
    return metrics
