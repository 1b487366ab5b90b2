"""The main job: train a DReg model on a dataset, evaluate retrieval, write a run folder.

``python scripts/train.py`` (or ``detreg-train``) runs :func:`run_training`
with the ``omniglot`` preset (:data:`DEFAULT_PRESET`) on the Omniglot alphabets
embedded in the package (train on 136 characters of 5 alphabets, retrieve among
the 106 characters of 3 unseen alphabets), with the raw-pixel and
untrained-network baselines (:func:`baseline_metrics`). ``--preset`` picks one
of :data:`PRESETS` and every other flag overrides a field of the preset
(:func:`resolve_config`).

One idea per module:

==============================================  =====================================================
:mod:`~detreg_keras.training.presets`           the recipes (``PRESETS``, ``DEFAULT_PRESET``)
:mod:`~detreg_keras.training.config`            ``TrainConfig``, ``resolve_config``, ``check_config``
:mod:`detreg_keras.data.registry`               datasets by name (``DATASETS``, ``load_splits``)
:mod:`~detreg_keras.training.inputs`            training batches and evaluation data of a config
:mod:`~detreg_keras.training.build`             ``build_model``, ``make_run_optimizer``
:mod:`~detreg_keras.training.reporting`         test metrics, baselines, the printed table
:mod:`~detreg_keras.training.runfolder`         the run folder (layout in its docstring)
:mod:`~detreg_keras.training.callbacks`         ``HistoryLog``, ``PeriodicCheckpoint``
:mod:`~detreg_keras.training.runner`            ``run_training`` (and resuming)
==============================================  =====================================================

Every name is importable from ``detreg_keras.training`` as before the split.
Embedding goes through the one path of :func:`detreg_keras.evaluation.embed`;
``embed_with_progress`` is kept for one release as a deprecated alias.
"""

from __future__ import annotations

import warnings
from typing import Any

import keras
import numpy as np

from detreg_keras.data.registry import (
    DATASET_PATH_FIELDS,
    DATASETS,
    REPO_ROOT,
    ArrayPair,
    DataSplits,
    Source,
    check_paths,
    load_splits,
    resolve_data_path,
    select_classes,
    source_labels,
)
from detreg_keras.evaluation import RetrievalEvaluation, embed, plot_recall_at_k
from detreg_keras.training.build import build_model, make_run_optimizer
from detreg_keras.training.callbacks import HistoryLog, PeriodicCheckpoint
from detreg_keras.training.config import TrainConfig, check_config, resolve_config
from detreg_keras.training.inputs import (
    TrainingInputs,
    make_array_dataset,
    make_evaluation_data,
    make_training_data,
    make_training_inputs,
    report_dropped,
)
from detreg_keras.training.presets import DEFAULT_PRESET, PRESETS
from detreg_keras.training.reporting import (
    MAX_MAP_POINTS,
    MAX_RAW_PIXEL_DIM,
    TABLE_COLUMNS,
    baseline_metrics,
    embed_split,
    evaluate_splits,
    format_table,
    method_label,
    pixel_vectors,
    raw_pixel_metrics,
    write_embedding_map,
)
from detreg_keras.training.runfolder import load_run_config, read_history
from detreg_keras.training.runner import run_training


def embed_with_progress(
    model: keras.Model, data: Any, total: int | None = None, batch_size: int = 256, verbose: int = 1, label: str = "embed"
) -> tuple[np.ndarray, np.ndarray]:
    """Deprecated alias (one release) of :func:`detreg_keras.evaluation.embed` with a progress display.

    ``embed_with_progress(model, data, total, batch_size, verbose, label)`` is
    ``embed(model, data, batch_size=batch_size, verbose=verbose, steps=total, name=label)``.
    """
    warnings.warn(
        "detreg_keras.training.embed_with_progress is deprecated; use "
        "detreg_keras.evaluation.embed(model, data, batch_size=..., verbose=..., steps=..., name=...).",
        DeprecationWarning,
        stacklevel=2,
    )
    return embed(model, data, batch_size=batch_size, verbose=verbose, steps=total, name=label)


__all__ = [
    "DATASETS",
    "DATASET_PATH_FIELDS",
    "DEFAULT_PRESET",
    "MAX_MAP_POINTS",
    "MAX_RAW_PIXEL_DIM",
    "PRESETS",
    "REPO_ROOT",
    "TABLE_COLUMNS",
    "ArrayPair",
    "DataSplits",
    "HistoryLog",
    "PeriodicCheckpoint",
    "RetrievalEvaluation",
    "Source",
    "TrainConfig",
    "TrainingInputs",
    "baseline_metrics",
    "build_model",
    "check_config",
    "check_paths",
    "embed_split",
    "embed_with_progress",
    "evaluate_splits",
    "format_table",
    "load_run_config",
    "load_splits",
    "make_array_dataset",
    "make_evaluation_data",
    "make_run_optimizer",
    "make_training_data",
    "make_training_inputs",
    "method_label",
    "pixel_vectors",
    "plot_recall_at_k",
    "raw_pixel_metrics",
    "read_history",
    "report_dropped",
    "resolve_config",
    "resolve_data_path",
    "run_training",
    "select_classes",
    "source_labels",
    "write_embedding_map",
]
