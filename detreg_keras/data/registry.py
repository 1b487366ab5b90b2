"""The dataset registry: a dataset name and a run's configuration -> class-disjoint splits.

:data:`DATASETS` maps each name to its loader ``cfg -> DataSplits``;
:func:`load_splits` loads one and applies ``subset_classes`` / ``val_classes``
/ ``evaluate_on``. ``cfg`` is a :class:`~detreg_keras.training.TrainConfig`
(the loaders read only its data fields: ``dataset``, ``data_root``,
``data_dir``, ``download``, ``train_dir``, ``test_dir``, ``class_depth``,
``subset_classes``, ``val_classes``, ``val_seed``, ``evaluate_on``).

Datasets: ``digits`` (embedded arrays), ``omniglot`` (embedded in the package;
``data_root``: the folder of the two small zips; ``data_dir``: the folder of
the full dataset's ``images_background.zip`` / ``images_evaluation.zip``),
``cub200`` / ``cars196`` / ``sop`` (tfds, ``data_dir``), ``inshop``
(``data_root``, query/gallery evaluation) and ``folder`` (your own
class-per-folder images: ``train_dir`` and ``test_dir``, or the classic
first-half / second-half class split of ``train_dir``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from detreg_keras.data.folders import load_image_folder, load_omniglot
from detreg_keras.data.omniglot_embedded import load_omniglot_split
from detreg_keras.data.records import ImageRecords
from detreg_keras.data.splits import carve_validation_classes
from detreg_keras.data.tfds_loaders import (
    load_cars196,
    load_cub200,
    load_inshop,
    load_sop,
)

if TYPE_CHECKING:
    from detreg_keras.training.config import TrainConfig

ArrayPair = tuple[np.ndarray, np.ndarray]
#: A split of a dataset: in-memory ``(images, labels)`` arrays, encoded
#: :class:`ImageRecords`, or an unbatched ``tf.data.Dataset`` of
#: ``(encoded image, label)`` (tfds).
Source = ArrayPair | ImageRecords | tf.data.Dataset

#: The repository root (relative data paths also resolve from here).
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class DataSplits:
    """The class-disjoint splits of a dataset.

    Attributes:
        train: training split, labels ``0..num_classes-1``.
        test: the evaluation set (all-vs-all), or the gallery when ``query`` is set.
        query: query set of a query/gallery evaluation (In-shop), else ``None``.
    """

    train: Source
    test: Source
    query: Source | None = None


def resolve_data_path(path: str | os.PathLike) -> Path:
    """``path`` as given if it exists (relative to the working directory), else
    relative to the repository root (so the default ``../shared/data/omniglot``
    works from any working directory)."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    candidate = REPO_ROOT / path
    return candidate if candidate.exists() else path


def _load_digits(cfg: TrainConfig) -> DataSplits:
    from detreg_keras.data.digits import load_digits_split  # noqa: PLC0415 (only the digits preset needs it)

    train, test = load_digits_split()
    return DataSplits(train, test)


def _load_omniglot(cfg: TrainConfig) -> DataSplits:
    """The embedded benchmark; ``data_root``: the small zips; ``data_dir``: the full dataset's zips."""
    if cfg.data_root is not None and cfg.data_dir is not None:
        raise ValueError("Give --data-root (the small Omniglot zips) or --data-dir (the full Omniglot zips), not both.")
    if cfg.data_root is None and cfg.data_dir is None:
        return DataSplits(*(load_omniglot_split(split).to_records() for split in ("train", "test")))
    full = cfg.data_dir is not None
    root = resolve_data_path(cfg.data_dir if full else cfg.data_root)
    return DataSplits(*(load_omniglot(root, split, full=full) for split in ("train", "test")))


def _tfds_loader(fn: Callable[..., Any]) -> Callable[[TrainConfig], DataSplits]:
    def load(cfg: TrainConfig) -> DataSplits:
        data = fn(cfg.data_dir, decode=False, download=cfg.download)
        return DataSplits(data.train, data.test)

    return load


def _load_inshop(cfg: TrainConfig) -> DataSplits:
    if not cfg.data_root:
        raise ValueError("The inshop dataset needs --data-root (the folder with list_eval_partition.txt).")
    data = load_inshop(resolve_data_path(cfg.data_root))
    return DataSplits(data.train, data.gallery, query=data.query)


def _load_folder(cfg: TrainConfig) -> DataSplits:
    if not cfg.train_dir:
        raise ValueError("The folder dataset needs --train-dir (one folder per class).")
    train = load_image_folder(resolve_data_path(cfg.train_dir), class_depth=cfg.class_depth)
    if cfg.test_dir:
        test = load_image_folder(resolve_data_path(cfg.test_dir), class_depth=cfg.class_depth)
        return DataSplits(train, test)
    # The DML protocol: first half of the (sorted) classes to train, the rest to test.
    half = train.num_classes // 2
    if half < 2 or train.num_classes - half < 2:
        raise ValueError(f"{cfg.train_dir} has {train.num_classes} classes; at least 4 are needed to split them.")
    return DataSplits(
        train.select_classes(range(half)), train.select_classes(range(half, train.num_classes))
    )


#: dataset name -> the TrainConfig path fields its loader reads (any other one given is an error).
DATASET_PATH_FIELDS: dict[str, tuple[str, ...]] = {
    "digits": (),
    "omniglot": ("data_root", "data_dir"),
    "cub200": ("data_dir",),
    "cars196": ("data_dir",),
    "sop": ("data_dir",),
    "inshop": ("data_root",),
    "folder": ("train_dir", "test_dir"),
}
_PATH_FLAGS = {"data_root": "--data-root", "data_dir": "--data-dir", "train_dir": "--train-dir", "test_dir": "--test-dir"}


def check_paths(cfg: TrainConfig) -> None:
    """Refuses a path the dataset would silently ignore (e.g. ``--data-dir`` with digits)."""
    used = DATASET_PATH_FIELDS.get(cfg.dataset, ())
    ignored = [name for name in _PATH_FLAGS if getattr(cfg, name) is not None and name not in used]
    if ignored:
        given = ", ".join(f"{_PATH_FLAGS[n]} {getattr(cfg, n)}" for n in ignored)
        reads = ", ".join(_PATH_FLAGS[n] for n in used) or "no path (its data ship with the package)"
        raise ValueError(f"The {cfg.dataset} dataset does not use {given}; it reads {reads}.")


#: dataset name -> loader ``cfg -> DataSplits``.
DATASETS: dict[str, Callable[[TrainConfig], DataSplits]] = {
    "digits": _load_digits,
    "omniglot": _load_omniglot,
    "cub200": _tfds_loader(load_cub200),
    "cars196": _tfds_loader(load_cars196),
    "sop": _tfds_loader(load_sop),
    "inshop": _load_inshop,
    "folder": _load_folder,
}


def source_labels(source: Source) -> np.ndarray:
    """The labels of a split, in order (a tf.data source is read once)."""
    if isinstance(source, ImageRecords):
        return source.labels
    if isinstance(source, tf.data.Dataset):
        chunks = [y for y in source.map(lambda x, y: y).batch(8192).as_numpy_iterator()]
        return np.concatenate(chunks) if chunks else np.zeros([0], np.int64)
    return np.asarray(source[1])


def source_class_names(source: Source) -> list[str] | None:
    """The class names of a split in label order (records name their classes; arrays and tf.data do not)."""
    return list(source.class_names) if isinstance(source, ImageRecords) else None


def select_classes(source: Source, class_ids: Iterable[int], labels: np.ndarray | None = None) -> Source:
    """The examples of ``class_ids``, relabelled ``0..len(class_ids)-1`` in that order."""
    ids = [int(c) for c in class_ids]
    if isinstance(source, ImageRecords):
        return source.select_classes(ids)
    labels = source_labels(source) if labels is None else labels
    size = int(max(int(labels.max()) if labels.size else 0, max(ids)) + 1)
    table = np.full(size, -1, dtype=np.int64)
    table[ids] = np.arange(len(ids))
    if isinstance(source, tf.data.Dataset):
        lookup = tf.constant(table)

        def keep(x, y):
            y = tf.cast(y, tf.int64)
            return tf.logical_and(y < size, tf.gather(lookup, tf.minimum(y, size - 1)) >= 0)

        return source.filter(keep).map(lambda x, y: (x, tf.gather(lookup, tf.cast(y, tf.int64))))
    x, y = source
    new = table[np.asarray(y)]
    mask = new >= 0
    return x[mask], new[mask].astype(np.asarray(y).dtype)


def first_classes(source: Source, count: int) -> Source:
    """The examples of the first ``count`` classes (sorted labels), relabelled ``0..count-1``."""
    labels = source_labels(source)
    classes = np.unique(labels)[:count]
    return select_classes(source, classes, labels)


def load_splits(cfg: TrainConfig) -> tuple[DataSplits, Source | None]:
    """Loads ``cfg.dataset`` and applies ``subset_classes`` and ``val_classes``.

    With ``evaluate_on="val"`` (hyper-parameter tuning) the validation
    classes take the place of the test split (which is listed by the loader
    but never embedded), and no per-epoch validation runs.

    Returns:
        ``(splits, validation)``: the train split without the validation
        classes, the test (and query) split, and the validation split (``None``
        without ``val_classes``), both relabelled to contiguous labels.
    """
    if cfg.dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {cfg.dataset!r}; available: {sorted(DATASETS)}.")
    check_paths(cfg)
    splits = DATASETS[cfg.dataset](cfg)
    if cfg.subset_classes:
        splits.train = first_classes(splits.train, cfg.subset_classes)
        if splits.query is None:
            splits.test = first_classes(splits.test, cfg.subset_classes)
    validation = None
    if cfg.val_classes:
        labels = source_labels(splits.train)
        train_ids, val_ids = carve_validation_classes(np.unique(labels).tolist(), cfg.val_classes, seed=cfg.val_seed)
        validation = select_classes(splits.train, val_ids, labels)
        splits.train = select_classes(splits.train, train_ids, labels)
    if cfg.evaluate_on == "val":
        if validation is None:
            raise ValueError("evaluate_on='val' needs val_classes > 0.")
        return DataSplits(splits.train, validation), None
    return splits, validation
