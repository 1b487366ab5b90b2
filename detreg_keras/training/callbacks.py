"""The run folder's Keras callbacks: the per-epoch history log and the periodic model file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np


class PeriodicCheckpoint(keras.callbacks.Callback):
    """Saves the full model (``model.save``) to ``path`` after every ``every``-th epoch.

    The training *state* (weights, optimizer, epoch) is backed up every epoch
    by ``BackupAndRestore``; this loadable model file is extra (``model.save``
    of a model with many flow layers costs about a second on a CPU).
    """

    def __init__(self, path: str | os.PathLike, every: int = 1):
        super().__init__()
        self.path = Path(path)
        self.every = int(every)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.every > 0 and (epoch + 1) % self.every == 0:
            self.model.save(self.path)


class HistoryLog(keras.callbacks.Callback):
    """Appends each epoch's logs to ``history.jsonl`` (``epoch`` is 1-based).

    Unlike ``CSVLogger`` it copes with keys that appear only on some epochs
    (validation every N epochs) and with resumed runs. ``epoch_seconds`` is
    the wall time of the epoch (training and the callbacks listed before this
    one, e.g. the validation).
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)
        self._start = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        row: dict[str, Any] = {"epoch": epoch + 1, "epoch_seconds": time.perf_counter() - self._start}
        row.update({k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
