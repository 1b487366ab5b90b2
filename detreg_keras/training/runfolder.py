"""The run folder: creating it, reading its ``config.json`` and ``history.jsonl`` back.

Layout (never overwritten; ``resume`` is the one case where an existing
folder is reused)::

    config.json        the resolved TrainConfig (what --resume reads back)
    history.jsonl      one JSON line per finished epoch (losses, val_* metrics)
    logs/              TensorBoard event files (train losses, val_* metrics)
    backup/            the checkpoint of every epoch: BackupAndRestore's weights,
                       optimizer state and epoch counter (what --resume
                       restores), removed once the run is complete
    checkpoint.keras   with checkpoint_every=N: the full model every N epochs
    best.keras         best model on the validation classes (--val-classes)
    model.keras        the final model
    baselines.json     with baselines=True: raw pixels and the untrained network
    metrics.json       test retrieval metrics of model.keras (and of best.keras,
                       and the baselines)
    recall_at_k.png    Recall@k curves of metrics.json (every row of the table)
    projector/         with embedding_map=True: TensorBoard Embedding Projector
                       files of the test split (tensorboard --logdir RUN/projector)
    embedding_map.png  with embedding_map=True: t-SNE map coloured by class
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from detreg_keras.training.config import TrainConfig


def new_run_dir(cfg: TrainConfig) -> Path:
    """Creates ``output_dir/run_name`` (default ``DATASET-FLOW-TIME``) and writes its ``config.json``.

    Raises:
        FileExistsError: the folder exists and is not empty (runs are never overwritten).
    """
    name = cfg.run_name or f"{cfg.dataset}-{cfg.flow}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.output_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"Run folder {run_dir} already exists and is not empty; choose another --run-name "
            "or --output-dir (runs are never overwritten; --resume RUN_DIR continues an interrupted run)."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return run_dir


def load_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The :class:`TrainConfig` saved in a run folder's ``config.json``."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a run folder of scripts/train.py.")
    return TrainConfig.from_dict(json.loads(path.read_text()))


def read_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch logs of a run (``history.jsonl``), one dict per epoch.

    An epoch logged twice (interrupted between logging and the backup, then
    redone) keeps its last entry.
    """
    path = Path(run_dir) / "history.jsonl"
    if not path.is_file():
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        by_epoch[int(row["epoch"])] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def backup_epoch(backup_dir: Path) -> int:
    """Epochs already finished according to a BackupAndRestore folder (0 if none)."""
    meta = backup_dir / "training_metadata.json"
    if not (backup_dir / "latest.weights.h5").is_file() or not meta.is_file():
        return 0
    return int(json.loads(meta.read_text()).get("epoch", 0))


def history_by_key(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """``{key: [value per epoch]}`` of :func:`read_history`'s rows (without ``epoch`` / ``epoch_seconds``)."""
    history: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("epoch", "epoch_seconds"):
                history.setdefault(key, []).append(value)
    return history
