"""The training recipe's optimizer: AdamW with per-parameter-group learning rates.

Paper Sec. 5.2: AdamW, learning rate 1e-4 for the backbone and 1e-3 for the
metric (flow) layers and the proxies, linear decay. The official Proxy Anchor
code uses a 100x learning rate on the proxies; both are multipliers here.

Keras 3 optimizers have one learning rate, so :class:`GroupAdamW` assigns each
variable a multiplier (and an optional first step, for warm-up epochs with a
frozen backbone) from regex rules on the variable path, first match wins.
Decoupled weight decay is scaled by the same multiplier (``θ ← θ - lr·m·wd·θ``),
as PyTorch's AdamW does per parameter group.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="detreg_keras")
class GroupAdamW(keras.optimizers.AdamW):
    """AdamW whose effective learning rate is ``lr(step) · multiplier(variable)``.

    Args:
        param_groups: list of ``{"pattern": regex, "lr_multiplier": float,
            "start_step": int, "ramp_steps": int}`` rules matched
            (``re.search``) against ``variable.path``; the first match wins. A
            variable that matches none uses multiplier 1, ``default_start_step``
            and no ramp. A variable is not updated (effective lr 0) while
            ``iterations < start_step``; with ``ramp_steps = R > 0`` its
            multiplier then rises linearly, ``× min(1, (iterations - start_step + 1) / R)``
            (a warm-up of that group).
        default_start_step: start step of unmatched variables (e.g. the
            backbone's warm-up).
        **kwargs: ``keras.optimizers.AdamW`` arguments (``learning_rate`` may be
            a schedule, ``weight_decay`` ...).
    """

    def __init__(self, param_groups: Sequence[dict] | None = None, default_start_step: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.param_groups = [
            {
                "pattern": str(g["pattern"]),
                "lr_multiplier": float(g.get("lr_multiplier", 1.0)),
                "start_step": int(g.get("start_step", 0)),
                "ramp_steps": int(g.get("ramp_steps", 0)),
            }
            for g in (param_groups or [])
        ]
        for group in self.param_groups:
            re.compile(group["pattern"])  # fail early on a bad regex
        self.default_start_step = int(default_start_step)
        self._group_of: dict[Any, tuple[float, int]] = {}
        self._ramp_of: dict[Any, int] = {}

    def group_for_path(self, path: str) -> tuple[float, int]:
        """``(lr_multiplier, start_step)`` of the variable at ``path``."""
        for group in self.param_groups:
            if re.search(group["pattern"], path):
                return group["lr_multiplier"], group["start_step"]
        return 1.0, self.default_start_step

    def ramp_for_path(self, path: str) -> int:
        """``ramp_steps`` of the variable at ``path`` (0: no warm-up ramp)."""
        for group in self.param_groups:
            if re.search(group["pattern"], path):
                return group["ramp_steps"]
        return 0

    def build(self, var_list):
        super().build(var_list)
        for variable in var_list:
            self._group_of[self._var_key(variable)] = self.group_for_path(variable.path)
            self._ramp_of[self._var_key(variable)] = self.ramp_for_path(variable.path)

    def _scale(self, variable) -> tf.Tensor | float:
        key = self._var_key(variable)
        multiplier, start_step = self._group_of.get(key, (1.0, self.default_start_step))
        ramp_steps = self._ramp_of.get(key, 0)
        scale = multiplier
        if start_step > 0:
            scale = scale * tf.cast(self.iterations >= start_step, variable.dtype)
        if ramp_steps > 0:
            done = tf.cast(self.iterations - start_step + 1, variable.dtype)
            scale = scale * tf.clip_by_value(done / float(ramp_steps), 0.0, 1.0)
        return scale

    def update_step(self, gradient, variable, learning_rate):
        scaled = tf.cast(learning_rate, variable.dtype) * tf.cast(self._scale(variable), variable.dtype)
        super().update_step(gradient, variable, scaled)

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None:
            return
        for variable in variables:
            if self._use_weight_decay(variable):
                lr = tf.cast(self.learning_rate, variable.dtype) * tf.cast(self._scale(variable), variable.dtype)
                wd = tf.cast(self.weight_decay, variable.dtype)
                variable.assign(variable - variable * wd * lr)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"param_groups": self.param_groups, "default_start_step": self.default_start_step})
        return config


#: Paths of DRegModel's metric heads and proxies (layer names set in detreg_keras.model).
FLOW_PATTERN = r"(^|/)dreg_flow_"
PROXY_PATTERN = r"(^|/)dreg_loss_"
EMBEDDING_PATTERN = r"(^|/)dreg_embedding"


def make_optimizer(
    learning_rate: float = 1e-4,
    head_lr_multiplier: float = 10.0,
    proxy_lr_multiplier: float = 10.0,
    embedding_lr_multiplier: float = 1.0,
    weight_decay: float = 1e-4,
    total_steps: int | None = None,
    warmup_steps: int = 0,
    end_learning_rate: float = 0.0,
    clipvalue: float | None = None,
    head_warmup_steps: int = 0,
    **kwargs: Any,
) -> GroupAdamW:
    """The paper's recipe: AdamW, backbone lr, 10x for heads and proxies, linear decay.

    Args:
        learning_rate: backbone learning rate (paper: 1e-4).
        head_lr_multiplier: flow heads' multiplier (paper: 10, i.e. 1e-3).
        proxy_lr_multiplier: proxies' multiplier (paper text: 10; the official
            Proxy Anchor code: 100).
        embedding_lr_multiplier: the GAP+GMP→Dense embedding layer's multiplier
            (official Proxy Anchor: 1, it is trained with the backbone).
        weight_decay: decoupled weight decay.
        total_steps: if given, the learning rate decays linearly to
            ``end_learning_rate`` over this many steps (paper: over 30 epochs).
        warmup_steps: the backbone and embedding stay frozen (lr 0) for these
            first steps while heads and proxies train ("warm-up epochs").
        end_learning_rate: final learning rate of the linear decay.
        clipvalue: if given, every gradient element is clipped to
            ``[-clipvalue, clipvalue]`` before the AdamW update (the official
            Proxy Anchor code clips by value at 10); ``None``: no clipping.
        head_warmup_steps: the flow heads' learning rate rises linearly from
            ``1/head_warmup_steps`` to its full value over these first steps
            (0: no warm-up of the heads).
        **kwargs: further ``GroupAdamW`` / ``AdamW`` arguments.

    Raises:
        ValueError: ``clipvalue`` is not a finite number > 0.
    """
    if int(head_warmup_steps) < 0:
        raise ValueError(f"head_warmup_steps must be >= 0, got {head_warmup_steps}.")
    if clipvalue is not None:
        clipvalue = float(clipvalue)
        if not (math.isfinite(clipvalue) and clipvalue > 0):
            raise ValueError(f"clipvalue must be a finite number > 0 (or None), got {clipvalue}.")
        kwargs["clipvalue"] = clipvalue
    schedule: Any = learning_rate
    if total_steps:
        schedule = keras.optimizers.schedules.PolynomialDecay(
            initial_learning_rate=learning_rate,
            decay_steps=int(total_steps),
            end_learning_rate=end_learning_rate,
            power=1.0,
        )
    groups = [
        {"pattern": FLOW_PATTERN, "lr_multiplier": head_lr_multiplier, "start_step": 0,
         "ramp_steps": int(head_warmup_steps)},
        {"pattern": PROXY_PATTERN, "lr_multiplier": proxy_lr_multiplier, "start_step": 0},
        {"pattern": EMBEDDING_PATTERN, "lr_multiplier": embedding_lr_multiplier, "start_step": warmup_steps},
    ]
    return GroupAdamW(
        param_groups=groups,
        default_start_step=warmup_steps,
        learning_rate=schedule,
        weight_decay=weight_decay,
        **kwargs,
    )
