"""The model and the optimizer a :class:`~detreg_keras.training.TrainConfig` describes."""

from __future__ import annotations

import keras

from detreg_keras.backbones import build_backbone
from detreg_keras.model import DRegModel
from detreg_keras.optim import make_optimizer
from detreg_keras.training.config import TrainConfig


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
        loss_config=cfg.loss_config,
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
