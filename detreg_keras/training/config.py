"""The configuration of a training run: :class:`TrainConfig` and :func:`resolve_config`.

The recipes themselves (field overrides per preset) live in
:mod:`detreg_keras.training.presets`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from detreg_keras.metrics import METRIC_NAMES
from detreg_keras.training.presets import DEFAULT_PRESET, PRESETS


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
    sampler: str = "random"  # one of SAMPLERS: random, m_per_class, spc_r, greedy_coreset, ddm, frd
    samples_per_class: int = 4  # m of m_per_class and of the embedded samplers (batch_size = P x m)
    sampler_refresh_epochs: int = 1  # embedded samplers: re-embed the training pool every N epochs
    sampler_candidates: int = 30  # ddm / frd: random candidate batches per batch (Roth et al. 2020: 30)
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
    loss_config: dict[str, Any] | None = None  # the loss' arguments, e.g. xbm: {"loss": ..., "memory_size": ...}
    # The three head defaults below and head_warmup_epochs = 1 let the heads train at the
    # paper's 1e-3 (issue 13; before: 2.0 / None / "none" / 0, RESULTS.md).
    log_scale_bound: float = 0.1  # bound of the coupling log-scales, s = b·tanh(ŝ/b)
    coupling_reduction: str = "sum"  # R over the K couplings: "sum" or "mean"
    shift_bound: float | None = 0.1  # bound of the coupling shifts, t = b·tanh(t̂/b); None: unbounded
    head_input_norm: str = "l2"  # "l2" (the heads see √d·z/‖z‖) or "none"
    # ------------------------------------------------------------ training
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 3e-4
    head_lr_multiplier: float = 1.0
    proxy_lr_multiplier: float = 10.0
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    head_warmup_epochs: float = 1.0  # the heads' lr ramps up linearly over these first epochs; 0: off
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
    embedding_map: bool = False  # also write projector/ and embedding_map.png of the test split (t-SNE: slow)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (what ``config.json`` holds)."""
        data = dataclasses.asdict(self)
        data["ks"] = [int(k) for k in self.ks]
        data["metrics"] = list(self.metrics)
        data["cnn_widths"] = [int(w) for w in self.cnn_widths]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The inverse of :meth:`to_dict` (unknown keys are an error).

        A run folder written before a field existed gets the value it was trained
        with (:data:`LEGACY_DEFAULTS`), not today's default.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Unknown TrainConfig fields {unknown}.")
        data = {**LEGACY_DEFAULTS, **data}
        for key in TUPLE_FIELDS:
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


#: Batch samplers by name (``TrainConfig.sampler``): the label samplers ``random``,
#: ``m_per_class`` and ``spc_r`` (:mod:`detreg_keras.data.sampling`) and the embedded
#: samplers of Roth et al. 2020 (:data:`EMBEDDED_SAMPLERS`), which pick each batch from
#: the current embeddings of the training images.
EMBEDDED_SAMPLERS = ("greedy_coreset", "ddm", "frd")
SAMPLERS = ("random", "m_per_class", "spc_r", *EMBEDDED_SAMPLERS)

#: Fields added after run folders were first written, with the behaviour those
#: older runs had (issue 13 added them and changed their defaults).
LEGACY_DEFAULTS: dict[str, Any] = {"shift_bound": None, "head_input_norm": "none", "head_warmup_epochs": 0.0}

#: Fields stored as tuples (JSON gives lists).
TUPLE_FIELDS = ("ks", "metrics", "cnn_widths")


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
    for key in TUPLE_FIELDS:
        if key in values:
            values[key] = tuple(values[key])
    return TrainConfig(**values)


def check_config(cfg: TrainConfig) -> None:
    """Refuses a configuration no run can train (a clear ``ValueError`` per field)."""
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
    _check_sampler(cfg)
    if not 0.0 < cfg.crop_scale_min <= 1.0:
        raise ValueError(f"crop_scale_min must lie in (0, 1], got {cfg.crop_scale_min}.")


def _check_sampler(cfg: TrainConfig) -> None:
    """Refuses an unknown sampler name and non-positive sampler settings."""
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {cfg.sampler!r}; valid samplers: {', '.join(SAMPLERS)}.")
    for name in ("samples_per_class", "sampler_refresh_epochs", "sampler_candidates"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}.")
