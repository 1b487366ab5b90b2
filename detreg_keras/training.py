"""The main job: train a DReg model on a dataset, evaluate retrieval, write a run folder.

``python scripts/train.py`` runs :func:`run_training` with the ``omniglot``
preset (:data:`DEFAULT_PRESET`) on the Omniglot alphabets embedded in the
package (train on 136 characters of 5 alphabets, retrieve among the 106
characters of 3 unseen alphabets), with the raw-pixel and untrained-network
baselines (:func:`baseline_metrics`). ``--preset`` picks one of
:data:`PRESETS` (the paper's recipe for CUB-200-2011, Cars196, SOP and
In-shop, the CPU-sized Omniglot recipe, digits as a fast smoke test) and every
other flag overrides a field of the preset (:func:`resolve_config`).

Run folder (never overwritten; ``resume`` is the one case where an existing
folder is reused)::

    config.json        the resolved TrainConfig (what --resume reads back)
    history.jsonl      one JSON line per finished epoch (losses, val_* metrics)
    logs/              TensorBoard event files (train losses, val_* metrics)
    backup/            the checkpoint of every epoch: BackupAndRestore's weights,
                       optimizer state and epoch counter (what --resume
                       restores), removed once the run is complete
    checkpoint.keras   with checkpoint_every=N: the full model every N epochs
                       (loadable with keras.models.load_model / evaluate.py)
    best.keras         best model on the validation classes (--val-classes)
    model.keras        the final model
    baselines.json     with baselines=True: raw pixels and the untrained network
    metrics.json       test retrieval metrics of model.keras (and of best.keras,
                       and the baselines)
    recall_at_k.png    Recall@k curves of metrics.json (every row of the table)

Resuming: a run interrupted at any point (an exception, Ctrl-C, a killed
process) continues with ``run_training(cfg, resume=run_dir)`` or
``scripts/train.py --resume RUN_DIR``: the weights, the optimizer state (the
learning-rate schedule follows ``optimizer.iterations``) and the epoch counter
come back from ``backup/``, the data pipelines skip the epochs already seen
(so the batches of epoch ``e`` are the ones an uninterrupted run would see),
and the best validation score so far is read back from ``history.jsonl``. A run
interrupted after its last epoch only redoes the final evaluation.

Datasets (:data:`DATASETS`): ``digits`` (embedded arrays), ``omniglot``
(embedded in the package; ``data_root``: the folder of the two small zips;
``data_dir``: the folder of the full dataset's ``images_background.zip`` /
``images_evaluation.zip``), ``cub200`` / ``cars196`` / ``sop`` (tfds,
``data_dir``), ``inshop`` (``data_root``, query/gallery evaluation) and
``folder`` (your own class-per-folder images: ``train_dir`` and ``test_dir``,
or the classic first-half / second-half class split of ``train_dir``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from detreg_keras.backbones import build_backbone
from detreg_keras.data import (
    DecodeStats,
    ImageRecords,
    RandomSampler,
    carve_validation_classes,
    index_dataset,
    load_cars196,
    load_cub200,
    load_image_folder,
    load_inshop,
    load_omniglot,
    load_omniglot_split,
    load_sop,
    m_per_class_steps,
    make_eval_dataset,
    make_train_dataset,
)
from detreg_keras.evaluation import RetrievalEvaluation, plot_recall_at_k
from detreg_keras.metrics import METRIC_NAMES, evaluate_embeddings
from detreg_keras.model import DRegModel
from detreg_keras.optim import make_optimizer

ArrayPair = tuple[np.ndarray, np.ndarray]
#: A split of a dataset: in-memory ``(images, labels)`` arrays, encoded
#: :class:`ImageRecords`, or an unbatched ``tf.data.Dataset`` of
#: ``(encoded image, label)`` (tfds).
Source = ArrayPair | ImageRecords | tf.data.Dataset

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class TrainConfig:
    """Every knob of a training run (the CLI flags map 1:1 onto these fields).

    The field defaults are the ``digits`` preset (the smallest recipe); the
    command line starts from :data:`DEFAULT_PRESET`. See :data:`PRESETS`.
    """

    preset: str = "digits"
    # ---------------------------------------------------------------- data
    dataset: str = "digits"
    data_root: str | None = None  # omniglot (the zips' folder; None: embedded data), inshop (dataset folder)
    data_dir: str | None = None  # tfds data directory (cub200, cars196, sop); omniglot: the full dataset's zips
    download: bool = False  # tfds download_and_prepare
    train_dir: str | None = None  # folder dataset
    test_dir: str | None = None  # folder dataset (None: split train_dir's classes in half)
    class_depth: int = 1  # folder dataset: folder levels that name a class
    val_classes: int = 0  # classes carved from the training classes for validation
    val_seed: int = 0  # seed of that carve (kept fixed across training seeds)
    subset_classes: int = 0  # smoke tests: keep only the first N train and test classes
    evaluate_on: str = "test"  # "val": final metrics on the validation classes, test never read (tuning)
    # ------------------------------------------------------------ pipeline
    image_size: int = 8
    channels: int = 1
    sampler: str = "random"  # "random" or "m_per_class"
    samples_per_class: int = 4  # m of m_per_class (batch_size = P x m)
    crop_scale_min: float = 0.08  # RandomResizedCrop area range (crop_scale_min, 1)
    flip: bool = True  # random horizontal flips
    eval_mode: str = "center_crop"  # "center_crop" (Resize(resize_size)+CenterCrop) or "resize"
    resize_size: int = 256
    # --------------------------------------------------------------- model
    backbone: str = "small_cnn"
    backbone_weights: str | None = "imagenet"
    cnn_widths: Sequence[int] = (32, 64, 128)  # small_cnn only: conv widths of its blocks
    embedding_dim: int = 128
    flow: str = "realnvp"
    num_couplings: int = 12
    hidden_units: int = 128
    dueling: bool = True
    lambda_min: float = 0.05
    lambda_max: float = 0.05
    epsilon: float = 0.4
    regularizer_form: str = "log1p"
    loss: str = "proxy_anchor"
    log_scale_bound: float = 2.0  # bound of the coupling log-scales, |s| < b
    coupling_reduction: str = "sum"  # R over the K couplings: "sum" or "mean"
    shift_bound: float | None = None  # bound of the coupling shifts, t = b·tanh(t̂/b); None: unbounded
    head_input_norm: str = "none"  # "none" or "l2" (the heads see √d·z/‖z‖)
    # ------------------------------------------------------------ training
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 3e-4
    head_lr_multiplier: float = 1.0
    proxy_lr_multiplier: float = 10.0
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    head_warmup_epochs: float = 0.0  # the heads' lr ramps up linearly over these first epochs; 0: off
    clipvalue: float | None = None  # clip every gradient element to [-c, c] (official Proxy Anchor: 10)
    seed: int = 0
    # ---------------------------------------------------------- evaluation
    ks: Sequence[int] = (1, 2, 4, 8)
    metrics: Sequence[str] = METRIC_NAMES
    eval_every: int = 1  # validation every N epochs (with val_classes)
    eval_batch_size: int = 256
    # -------------------------------------------------------------- output
    output_dir: str = "runs"
    run_name: str | None = None
    checkpoint_every: int = 0  # also save the full model (checkpoint.keras) every N epochs; 0: off
    verbose: int = 2

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ks"] = [int(k) for k in self.ks]
        data["metrics"] = list(self.metrics)
        data["cnn_widths"] = [int(w) for w in self.cnn_widths]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The inverse of :meth:`to_dict` (unknown keys are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Unknown TrainConfig fields {unknown}.")
        data = dict(data)
        for key in _TUPLE_FIELDS:
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


_TUPLE_FIELDS = ("ks", "metrics", "cnn_widths")


# ----------------------------------------------------------------------------- presets

#: The paper's recipe (Sec. 5.2) for the four benchmarks. Notes:
#:
#: * backbone: the paper uses BN-Inception (ImageNet-pretrained), which Keras
#:   Applications does not ship; ``inception_v3`` (same family, 2048-d features
#:   instead of 1024-d) is the substitute (``--backbone resnet50`` is the other
#:   common DML backbone). BatchNorm is frozen, as in the paper.
#: * batch size 180 with *random* batches for all four: this is what the
#:   official Proxy Anchor commands use (``--batch-size 180`` and no ``--IPC``,
#:   i.e. the ``shuffle=True`` DataLoader, for CUB, Cars, SOP and In-shop). A
#:   class-balanced alternative: ``--sampler m_per_class --samples-per-class 4``.
#: * learning rates: 1e-4 for the backbone and the embedding layer, 10x (1e-3)
#:   for the flow heads and the proxies, AdamW (weight decay 1e-4), linear decay
#:   to 0 over 30 epochs. (The official Proxy Anchor code uses 100x on the
#:   proxies, and 6e-4 with trainable BN for SOP / In-shop; the DReg paper gives
#:   one recipe for all four datasets, which is used here.)
#: * one warm-up epoch with a frozen backbone (and embedding layer) while the
#:   heads and proxies train, like the official code's ``--warm 1`` (which
#:   keeps its embedding layer trainable; the paper does not mention warm-up).
#: * images: RandomResizedCrop(224) + horizontal flip for training, Resize(256)
#:   + CenterCrop(224) for evaluation.
_PAPER_RECIPE: dict[str, Any] = dict(
    backbone="inception_v3",
    backbone_weights="imagenet",
    image_size=224,
    channels=3,
    sampler="random",
    crop_scale_min=0.08,
    flip=True,
    eval_mode="center_crop",
    resize_size=256,
    embedding_dim=512,
    flow="realnvp",
    num_couplings=12,
    hidden_units=512,
    dueling=True,
    lambda_min=0.05,
    lambda_max=0.05,
    epsilon=0.4,
    epochs=30,
    batch_size=180,
    learning_rate=1e-4,
    head_lr_multiplier=10.0,
    proxy_lr_multiplier=10.0,
    weight_decay=1e-4,
    warmup_epochs=1,
    eval_batch_size=128,
    checkpoint_every=1,
    verbose=1,
)

#: Omniglot on 2 CPU cores: a narrow small CNN (16-32-64) from scratch on 28x28
#: grayscale characters (resized from 105x105), class-balanced batches of 16
#: classes x 4 images (every image has same-class partners for the
#: between-sample augmentation), mild crops and no flips (a mirrored character
#: is another glyph), 15 epochs. Tuned on 34 validation characters carved from
#: the training alphabets (never on the test alphabets; see RESULTS.md): the
#: backbone at 1e-3, and the flow heads at 0.1x (1e-4) -- at 1e-3 the 12-coupling
#: heads trained so badly that DReg fell to ~20% Recall@1 even with lambda = 0.
_OMNIGLOT_RECIPE: dict[str, Any] = dict(
    dataset="omniglot",
    backbone="small_cnn",
    backbone_weights=None,
    cnn_widths=(16, 32, 64),
    image_size=28,
    channels=1,
    sampler="m_per_class",
    samples_per_class=4,
    crop_scale_min=0.7,
    flip=False,
    eval_mode="resize",
    embedding_dim=128,
    num_couplings=12,
    hidden_units=128,
    epochs=15,
    batch_size=64,
    learning_rate=1e-3,
    head_lr_multiplier=0.1,
    proxy_lr_multiplier=10.0,
    weight_decay=1e-4,
    warmup_epochs=0,
    verbose=2,
)

#: The preset of ``scripts/train.py`` without ``--preset`` (and of :func:`resolve_config`).
DEFAULT_PRESET = "omniglot"

#: preset name -> TrainConfig field overrides (``digits`` is TrainConfig's defaults).
PRESETS: dict[str, dict[str, Any]] = {
    "digits": {},
    "omniglot": _OMNIGLOT_RECIPE,
    "cub200": {**_PAPER_RECIPE, "dataset": "cub200", "ks": (1, 2, 4, 8)},
    "cars196": {**_PAPER_RECIPE, "dataset": "cars196", "ks": (1, 2, 4, 8)},
    "sop": {**_PAPER_RECIPE, "dataset": "sop", "ks": (1, 10, 100, 1000)},
    "inshop": {**_PAPER_RECIPE, "dataset": "inshop", "ks": (1, 10, 20, 30, 40, 50)},
}


def resolve_config(preset: str = DEFAULT_PRESET, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a preset, with ``overrides`` on top.

    Args:
        preset: a key of :data:`PRESETS`.
        **overrides: TrainConfig fields; they win over the preset's values.

    Raises:
        ValueError: unknown preset or field.
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; available: {sorted(PRESETS)}.")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"Unknown TrainConfig fields {unknown}.")
    values = {**PRESETS[preset], **overrides, "preset": preset}
    for key in _TUPLE_FIELDS:
        if key in values:
            values[key] = tuple(values[key])
    return TrainConfig(**values)


# ----------------------------------------------------------------------------- datasets


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
    from detreg_keras.data.digits import load_digits_split

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


def _first_classes(source: Source, count: int) -> Source:
    labels = source_labels(source)
    classes = np.unique(labels)[:count]
    return select_classes(source, classes, labels)


def _with_channels(ds: tf.data.Dataset, channels: int) -> tf.data.Dataset:
    """The pipelines yield RGB; ``channels=1`` averages to grayscale."""
    if channels == 3:
        return ds
    if channels != 1:
        raise ValueError(f"channels must be 1 or 3 for image datasets, got {channels}.")
    return ds.map(lambda x, y: (tf.reduce_mean(x, axis=-1, keepdims=True), y), num_parallel_calls=tf.data.AUTOTUNE)


def make_array_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool, seed: int) -> tf.data.Dataset:
    """Batches of ``(images, labels)`` from in-memory arrays, reshuffled every epoch.

    The order of the ``e``-th iteration (epoch) is the permutation drawn from
    ``numpy.random.default_rng([seed, e])``, a function of the seed and the
    epoch number only, like the samplers of :mod:`detreg_keras.data.sampling`
    (so a resumed run can skip to the right epoch).
    """
    if len(images) == 0:
        raise ValueError("The training set is empty: no images to train on.")
    images_t = tf.constant(images.astype("float32"))
    labels_t = tf.constant(labels.astype("int32"))
    n = len(images)
    if not shuffle:
        return tf.data.Dataset.from_tensor_slices((images_t, labels_t)).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    order = index_dataset(RandomSampler(n, seed=seed), with_seeds=False)  # default_rng([seed, e]).permutation(n)
    ds = order.batch(batch_size).map(lambda idx: (tf.gather(images_t, idx), tf.gather(labels_t, idx)))
    ds = ds.apply(tf.data.experimental.assert_cardinality(math.ceil(n / batch_size)))
    return ds.prefetch(tf.data.AUTOTUNE)


def make_training_data(
    source: Source, cfg: TrainConfig, labels: np.ndarray | None = None, stats: DecodeStats | None = None
) -> tuple[tf.data.Dataset, int]:
    """The training pipeline of ``cfg`` and its number of batches per epoch.

    Each new iteration of the returned dataset is the next epoch (a new order
    and new augmentations), which :func:`run_training` uses to skip the epochs
    already trained when a run resumes.

    Args:
        source: the training split.
        cfg: batch size, sampler, image size, augmentation, seed.
        labels: ``source_labels(source)`` if already known (saves a pass over
            a tfds split).
    """
    if isinstance(source, tuple):
        x, y = source
        steps = math.ceil(len(x) / cfg.batch_size)
        return make_array_dataset(x, y, cfg.batch_size, shuffle=True, seed=cfg.seed), steps
    labels = source_labels(source) if labels is None else labels
    if labels.size == 0:
        raise ValueError("The training set is empty: no images to train on.")
    if cfg.sampler == "m_per_class":
        if cfg.batch_size % cfg.samples_per_class:
            raise ValueError(
                f"batch_size={cfg.batch_size} must be a multiple of samples_per_class={cfg.samples_per_class}."
            )
        steps = m_per_class_steps(labels, cfg.batch_size // cfg.samples_per_class, cfg.samples_per_class)
        ds = make_train_dataset(
            source,
            cfg.batch_size,
            cfg.image_size,
            sampler="m_per_class",
            samples_per_class=cfg.samples_per_class,
            seed=cfg.seed,
            scale=(cfg.crop_scale_min, 1.0),
            flip=cfg.flip,
            stats=stats,
        )
    elif cfg.sampler == "random":
        steps = len(labels) // cfg.batch_size
        if steps == 0:
            raise ValueError(f"batch_size={cfg.batch_size} is larger than the training set ({len(labels)} images).")
        ds = make_train_dataset(
            source,
            cfg.batch_size,
            cfg.image_size,
            sampler="random",
            seed=cfg.seed,
            scale=(cfg.crop_scale_min, 1.0),
            flip=cfg.flip,
            stats=stats,
        )
    else:
        raise ValueError(f"sampler must be 'random' or 'm_per_class', got {cfg.sampler!r}.")
    return _with_channels(ds, cfg.channels), steps


def make_evaluation_data(
    source: Source, cfg: TrainConfig, stats: DecodeStats | None = None
) -> tuple[Any, int | None]:
    """Evaluation data for :func:`embed_with_progress` and its number of batches (if known).

    ``stats`` (optional) counts the images the pipeline drops as unreadable.
    """
    if isinstance(source, tuple):
        x, y = source
        return (x.astype("float32"), y), math.ceil(len(x) / cfg.eval_batch_size)
    ds = make_eval_dataset(
        source, cfg.eval_batch_size, cfg.image_size, resize_size=cfg.resize_size, mode=cfg.eval_mode, stats=stats
    )
    total = math.ceil(len(source) / cfg.eval_batch_size) if isinstance(source, ImageRecords) else None
    return _with_channels(ds, cfg.channels), total


def embed_with_progress(
    model: keras.Model, data: Any, total: int | None = None, batch_size: int = 256, verbose: int = 1, label: str = "embed"
) -> tuple[np.ndarray, np.ndarray]:
    """Embeds ``(x, y)`` arrays or a batched ``(images, labels)`` dataset, with a progress bar.

    Args:
        verbose: 1 shows a Keras progress bar, 2 one line when done, 0 nothing.

    Returns:
        ``(embeddings [N, d] float32, labels [N])``.
    """
    start = time.perf_counter()
    bar = keras.utils.Progbar(total, unit_name="batch") if verbose == 1 else None
    if isinstance(data, tuple):
        images, labels = data
        batches = (
            (images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(images), batch_size)
        )
    else:
        batches = ((x, y.numpy()) for x, y in data)
    embs, labs = [], []
    for step, (x_batch, y_batch) in enumerate(batches, start=1):
        embs.append(np.asarray(model.predict_on_batch(x_batch), dtype=np.float32))
        labs.append(np.asarray(y_batch).reshape(-1))
        if bar is not None:
            bar.update(step)
    if not embs:
        raise ValueError("Nothing to embed: the evaluation set is empty.")
    emb, lab = np.concatenate(embs), np.concatenate(labs)
    if verbose == 2:
        print(f"{label}: {len(emb)} images embedded in {time.perf_counter() - start:.1f}s")
    return emb, lab


def report_dropped(stats: DecodeStats, what: str) -> int:
    """Prints one ``warning:`` line (stderr) if the pipeline counted by ``stats`` dropped images.

    The pipelines skip images that fail to decode (e.g. a JPEG cut off in a copy:
    its header passes the listing check, its data does not decode), so that a
    bad file does not stop a run; this makes every such drop visible once the
    iteration has finished.

    Args:
        stats: the :class:`DecodeStats` passed to the pipeline.
        what: what was read, for the message (``"test images"``).

    Returns:
        The number of dropped images.
    """
    dropped = stats.dropped
    if dropped > 0:
        print(f"warning: {what}: {stats.summary()}; those files are unreadable (re-copy or remove them).",
              file=sys.stderr, flush=True)  # fmt: skip
    return dropped


def evaluate_splits(model: keras.Model, splits: DataSplits, cfg: TrainConfig, verbose: int | None = None) -> dict[str, float]:
    """Test metrics of ``model``: all-vs-all on ``splits.test`` or query/gallery (In-shop)."""
    verbose = cfg.verbose if verbose is None else verbose
    name = "test" if splits.query is None else "gallery"
    stats = DecodeStats()
    data, total = make_evaluation_data(splits.test, cfg, stats)
    emb, labels = embed_with_progress(model, data, total, cfg.eval_batch_size, verbose, name)
    report_dropped(stats, f"{name} images")
    q_emb = q_labels = None
    if splits.query is not None:
        stats = DecodeStats()
        data, total = make_evaluation_data(splits.query, cfg, stats)
        q_emb, q_labels = embed_with_progress(model, data, total, cfg.eval_batch_size, verbose, "query")
        report_dropped(stats, "query images")
    return evaluate_embeddings(
        emb, labels, ks=tuple(cfg.ks), query_embeddings=q_emb, query_labels=q_labels, metrics=tuple(cfg.metrics)
    )


# ----------------------------------------------------------------------------- baselines

#: Pixel vectors longer than this get no raw-pixel row (a 224x224 RGB dataset would need GBs).
MAX_RAW_PIXEL_DIM = 16_384
#: metric key -> table column (the recall columns come first, one per k).
TABLE_COLUMNS = {"map@r": "MAP@R", "nmi": "NMI"}


def method_label(cfg: TrainConfig) -> str:
    """The name of a run's method in tables and plots: ``"DReg (realnvp)"`` or ``"Proxy Anchor"``."""
    return "Proxy Anchor" if cfg.flow == "none" else f"DReg ({cfg.flow})"


def pixel_vectors(source: Source, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation images of ``source`` as the network receives them, flattened.

    Returns:
        ``(pixels [N, image_size * image_size * channels] float32, labels [N])``.
    """
    data, _ = make_evaluation_data(source, cfg)
    if isinstance(data, tuple):
        images, labels = data
        return images.reshape(len(images), -1), np.asarray(labels)
    chunks = [(x.numpy().reshape(len(x), -1), y.numpy()) for x, y in data]
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def raw_pixel_metrics(splits: DataSplits, cfg: TrainConfig) -> dict[str, float] | None:
    """Retrieval on the raw pixels: the metrics of :func:`evaluate_splits` with each image's
    mean-centred pixel vector as its embedding (cosine similarity, as for the embeddings).

    Centring by the mean image of the evaluated set (its gallery, in query/gallery
    mode) makes the result the same whether ink is dark on light (Omniglot) or light
    on dark (digits). ``None`` when the pixel vectors are longer than
    :data:`MAX_RAW_PIXEL_DIM`.
    """
    if cfg.image_size * cfg.image_size * cfg.channels > MAX_RAW_PIXEL_DIM:
        return None
    gallery, labels = pixel_vectors(splits.test, cfg)
    mean = gallery.mean(axis=0)
    query = query_labels = None
    if splits.query is not None:
        query, query_labels = pixel_vectors(splits.query, cfg)
        query = query - mean
    return evaluate_embeddings(
        gallery - mean, labels, ks=tuple(cfg.ks), query_embeddings=query, query_labels=query_labels,
        metrics=tuple(cfg.metrics),
    )  # fmt: skip


def baseline_metrics(model: keras.Model, splits: DataSplits, cfg: TrainConfig) -> dict[str, dict[str, float]]:
    """The reference rows of the main job's table, on the test split.

    Args:
        model: the run's model *before training* (its initial weights).
        splits: the run's splits.
        cfg: the run's configuration.

    Returns:
        ``{"raw pixels": ..., "untrained network": ...}`` (no raw-pixel row for
        images larger than :data:`MAX_RAW_PIXEL_DIM` values).
    """
    rows: dict[str, dict[str, float]] = {}
    raw = raw_pixel_metrics(splits, cfg)
    if raw is not None:
        rows["raw pixels"] = raw
    rows["untrained network"] = dict(evaluate_splits(model, splits, cfg, verbose=0))
    return rows


def format_table(rows: dict[str, dict[str, Any]], ks: Sequence[int]) -> str:
    """A plain-text table of retrieval metrics in percent, one row per method.

    Args:
        rows: ``{method: metrics}`` (keys ``recall@k``, ``map@r``, ``nmi``;
            missing ones print as ``-``).
        ks: the Recall@k columns.
    """
    columns = {f"recall@{k}": f"R@{k}" for k in ks} | TABLE_COLUMNS
    width = max(len("method"), *(len(name) for name in rows))
    lines = ["  ".join([f"{'method':<{width}}", *(f"{title:>6}" for title in columns.values())])]
    for name, metrics in rows.items():
        cells = [f"{100 * metrics[key]:6.2f}" if key in metrics else f"{'-':>6}" for key in columns]
        lines.append("  ".join([f"{name:<{width}}", *cells]))
    return "\n".join(lines)


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
        splits.train = _first_classes(splits.train, cfg.subset_classes)
        if splits.query is None:
            splits.test = _first_classes(splits.test, cfg.subset_classes)
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


# ----------------------------------------------------------------------------- run folder


def _new_run_dir(cfg: TrainConfig) -> Path:
    name = cfg.run_name or f"{cfg.dataset}-{cfg.flow}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.output_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"Run folder {run_dir} already exists and is not empty; choose another --run-name "
            "or --output-dir (runs are never overwritten; --resume RUN_DIR continues an interrupted run)."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
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


def _backup_epoch(backup_dir: Path) -> int:
    """Epochs already finished according to a BackupAndRestore folder (0 if none)."""
    meta = backup_dir / "training_metadata.json"
    if not (backup_dir / "latest.weights.h5").is_file() or not meta.is_file():
        return 0
    return int(json.loads(meta.read_text()).get("epoch", 0))


def _skip_epochs(ds: tf.data.Dataset, epochs: int) -> None:
    """Moves a training pipeline ``epochs`` epochs ahead (one batch read per epoch)."""
    for _ in range(epochs):
        for _ in ds.take(1):
            pass


def build_model(cfg: TrainConfig, num_classes: int) -> DRegModel:
    """The ``DRegModel`` described by ``cfg``."""
    backbone: keras.Model | str = cfg.backbone
    if cfg.backbone == "small_cnn":
        backbone = build_backbone(
            "small_cnn", image_size=cfg.image_size, channels=cfg.channels, small_cnn_widths=tuple(cfg.cnn_widths)
        )
    return DRegModel(
        num_classes=num_classes,
        backbone=backbone,
        image_size=cfg.image_size,
        channels=cfg.channels,
        backbone_weights=cfg.backbone_weights,
        embedding_dim=cfg.embedding_dim,
        flow=cfg.flow,
        num_couplings=cfg.num_couplings,
        hidden_units=(cfg.hidden_units,),
        dueling=cfg.dueling,
        lambda_min=cfg.lambda_min,
        lambda_max=cfg.lambda_max,
        epsilon=cfg.epsilon,
        regularizer_form=cfg.regularizer_form,
        loss=cfg.loss,
        log_scale_bound=cfg.log_scale_bound,
        coupling_reduction=cfg.coupling_reduction,
        shift_bound=cfg.shift_bound,
        head_input_norm=cfg.head_input_norm,
    )


def make_run_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer of a run: :func:`make_optimizer` with ``cfg``'s rates and its schedule in steps."""
    return make_optimizer(
        learning_rate=cfg.learning_rate,
        head_lr_multiplier=cfg.head_lr_multiplier,
        proxy_lr_multiplier=cfg.proxy_lr_multiplier,
        weight_decay=cfg.weight_decay,
        total_steps=steps_per_epoch * cfg.epochs,
        warmup_steps=steps_per_epoch * cfg.warmup_epochs,
        clipvalue=cfg.clipvalue,
        head_warmup_steps=int(round(steps_per_epoch * cfg.head_warmup_epochs)),
    )


def _check_config(cfg: TrainConfig) -> None:
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg.epochs}.")
    if cfg.batch_size < 2:
        raise ValueError(f"batch_size must be >= 2, got {cfg.batch_size}.")
    if cfg.warmup_epochs >= cfg.epochs:
        raise ValueError(f"warmup_epochs={cfg.warmup_epochs} leaves no epoch to train the backbone (epochs={cfg.epochs}).")
    if cfg.eval_mode not in ("center_crop", "resize"):
        raise ValueError(f"eval_mode must be 'center_crop' or 'resize', got {cfg.eval_mode!r}.")
    if cfg.evaluate_on not in ("test", "val"):
        raise ValueError(f"evaluate_on must be 'test' or 'val', got {cfg.evaluate_on!r}.")
    if not 0.0 < cfg.crop_scale_min <= 1.0:
        raise ValueError(f"crop_scale_min must lie in (0, 1], got {cfg.crop_scale_min}.")


def _describe(source: Source, labels: np.ndarray | None = None) -> str:
    """``"2720 images of 136 classes"`` (a tfds split is not read for it: ``"a tfds split"``)."""
    if labels is None and isinstance(source, tf.data.Dataset):
        return "a tfds split"
    labels = source_labels(source) if labels is None else labels
    return f"{len(labels):,} images of {len(np.unique(labels)):,} classes"


def _run_baselines(model: keras.Model, splits: DataSplits, cfg: TrainConfig, run_dir: Path) -> dict[str, dict[str, float]]:
    """:func:`baseline_metrics` of the untrained ``model``, or those a resumed run saved."""
    path = run_dir / "baselines.json"
    if path.is_file():
        return json.loads(path.read_text())
    rows = baseline_metrics(model, splits, cfg)
    path.write_text(json.dumps(rows, indent=2))
    return rows


def run_training(
    cfg: TrainConfig,
    *,
    resume: str | os.PathLike | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    baselines: bool = False,
    references: dict[str, dict[str, Any]] | None = None,
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
    _check_config(cfg)
    if resume is not None:
        run_dir = Path(resume)
        saved = load_run_config(run_dir)
        if (run_dir / "metrics.json").exists():
            raise ValueError(f"{run_dir} is a finished run (metrics.json exists); nothing to resume.")
        if saved.to_dict() != {**cfg.to_dict(), "verbose": saved.verbose}:
            raise ValueError(f"cfg differs from {run_dir / 'config.json'}; resume with load_run_config(run_dir).")
    keras.utils.set_random_seed(cfg.seed)
    splits, validation = load_splits(cfg)
    train_labels = source_labels(splits.train)
    train_stats = DecodeStats()
    train_ds, steps_per_epoch = make_training_data(splits.train, cfg, train_labels, train_stats)
    num_classes = int(train_labels.max()) + 1
    if cfg.verbose:
        print(f"{method_label(cfg)} on {cfg.dataset}: training on {_describe(splits.train, train_labels)}, "
              f"testing on {_describe(splits.test)}", flush=True)  # fmt: skip
    if resume is None:
        run_dir = _new_run_dir(cfg)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    backup_dir = run_dir / "backup"

    model = build_model(cfg, num_classes)
    model.build((None, cfg.image_size, cfg.image_size, cfg.channels))  # BackupAndRestore needs a built model
    model.compile(optimizer=make_run_optimizer(cfg, steps_per_epoch))
    reference_rows = _run_baselines(model, splits, cfg, run_dir) if baselines else {}

    done = _backup_epoch(backup_dir) if resume is not None else 0
    if done:
        _skip_epochs(train_ds, done)
        if cfg.verbose:
            print(f"Resuming {run_dir} after epoch {done}/{cfg.epochs}.")

    fit_callbacks: list[keras.callbacks.Callback] = list(callbacks)
    val_callback = None
    if validation is not None:
        val_size = len(source_labels(validation))
        if val_size < 2:
            raise ValueError(f"The {cfg.val_classes} validation class(es) hold {val_size} image(s); retrieval needs 2+.")
        # Recall@k needs k < the validation set's size (each query leaves itself out).
        val_ks = tuple(k for k in cfg.ks if k < val_size) or (1,)
        val_data, _ = make_evaluation_data(validation, cfg)
        val_callback = RetrievalEvaluation(
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
            val_callback.best, val_callback.best_epoch = best["val_recall@1"], best["epoch"] - 1
        fit_callbacks.append(val_callback)
    fit_callbacks += [
        HistoryLog(run_dir / "history.jsonl"),
        keras.callbacks.TensorBoard(log_dir=str(run_dir / "logs"), write_graph=False, profile_batch=0),
        PeriodicCheckpoint(run_dir / "checkpoint.keras", cfg.checkpoint_every),
        # Kept after the run until model.keras and metrics.json exist, so that an
        # interruption during the final evaluation does not restart training.
        keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=False),
    ]

    with warnings.catch_warnings():
        # Pipelines over records have no known length until their first epoch ends; Keras
        # then warns that the input "ran out of data", which is how such an epoch ends.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        model.fit(train_ds, epochs=cfg.epochs, verbose=cfg.verbose, callbacks=fit_callbacks, shuffle=False)
    report_dropped(train_stats, "training images (all epochs)")

    model.save(run_dir / "model.keras")
    eval_start = time.perf_counter()
    metrics: dict[str, Any] = dict(evaluate_splits(model, splits, cfg))
    curves = {**reference_rows, **(references or {}), method_label(cfg): metrics}
    if val_callback is not None and (run_dir / "best.keras").is_file():
        best_model = keras.models.load_model(run_dir / "best.keras")
        best_metrics = dict(evaluate_splits(best_model, splits, cfg))
        best_metrics["epoch"] = None if val_callback.best_epoch is None else val_callback.best_epoch + 1
        best_metrics["val_recall@1"] = float(val_callback.best)
        metrics["best_checkpoint"] = best_metrics
        curves[f"{method_label(cfg)}, best on validation"] = best_metrics
    history_rows = read_history(run_dir)
    metrics["epochs"] = len(history_rows)
    metrics["train_seconds"] = float(sum(row.get("epoch_seconds", 0.0) for row in history_rows))
    metrics["eval_seconds"] = time.perf_counter() - eval_start
    if reference_rows:
        metrics["baselines"] = reference_rows
    where = "validation classes" if cfg.evaluate_on == "val" else "unseen classes"
    plot_recall_at_k(curves, run_dir / "recall_at_k.png", title=f"{cfg.dataset}, {where}: Recall@k")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(backup_dir, ignore_errors=True)
    history: dict[str, list[float]] = {}
    for row in history_rows:
        for key, value in row.items():
            if key not in ("epoch", "epoch_seconds"):
                history.setdefault(key, []).append(value)
    return {"run_dir": str(run_dir), "metrics": metrics, "history": history}

