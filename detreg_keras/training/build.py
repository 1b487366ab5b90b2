"""The model and the optimizer a :class:`~detreg_keras.training.TrainConfig` describes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from detreg_keras.backbones import build_backbone
from detreg_keras.model import DRegModel
from detreg_keras.optim import make_optimizer
from detreg_keras.training.config import TrainConfig


def loss_config_of(cfg: TrainConfig, class_names: Sequence[str] | None = None) -> dict[str, Any] | None:
    """``cfg.loss_config``, with the training class names added for ``loss="language_guidance"``.

    Language guidance embeds the class names (in label order) unless the user
    gave ``class_names`` or an array / mapping of ``class_embeddings`` already.

    Raises:
        ValueError: language guidance on a dataset that names no classes and no
            ``class_embeddings`` array in ``loss_config``.
    """
    config = dict(cfg.loss_config or {})
    if cfg.loss != "language_guidance" or "class_names" in config:
        return cfg.loss_config
    if not isinstance(config.get("class_embeddings", "hashed_ngram"), str):
        return cfg.loss_config
    if class_names is None:
        raise ValueError(
            f"loss='language_guidance' needs the class names of the training split, but dataset "
            f"{cfg.dataset!r} gives none; pass them as loss_config['class_names'] (in label order) or "
            "pass a [num_classes, dim] array as loss_config['class_embeddings']."
        )
    return {**config, "class_names": list(class_names)}


def build_model(cfg: TrainConfig, num_classes: int, class_names: Sequence[str] | None = None) -> DRegModel:
    """The ``DRegModel`` described by ``cfg`` (``class_names``: the training labels' names, for language guidance)."""
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
        loss_config=loss_config_of(cfg, class_names),
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
