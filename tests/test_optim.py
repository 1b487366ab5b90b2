"""GroupAdamW: per-group learning rates, warm-up freezing, decoupled decay, serialisation."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from detreg_keras.optim import GroupAdamW, make_optimizer


class _Toy(keras.layers.Layer):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.a = keras.layers.Dense(1, use_bias=False, name="dreg_flow_min")
        self.b = keras.layers.Dense(1, use_bias=False, name="dreg_loss_min")
        self.c = keras.layers.Dense(1, use_bias=False, name="conv1")

    def build(self, shape):
        for layer in (self.a, self.b, self.c):
            layer.build(shape)

    def call(self, x):
        return self.a(x) + self.b(x) + self.c(x)


def _variables():
    toy = _Toy()
    toy.build((None, 1))
    for layer in (toy.a, toy.b, toy.c):
        layer.kernel.assign(np.ones((1, 1), "float32"))
    return toy.a.kernel, toy.b.kernel, toy.c.kernel


def test_first_adam_step_is_lr_times_multiplier():
    flow, proxy, backbone = _variables()
    opt = make_optimizer(learning_rate=1e-3, head_lr_multiplier=10.0, proxy_lr_multiplier=100.0, weight_decay=0.0)
    grads = [np.full((1, 1), 0.5, "float32")] * 3
    opt.apply(grads, [flow, proxy, backbone])
    # Adam's first step moves each weight by lr_eff * sign(grad) (bias-corrected m / sqrt(v) = 1)
    np.testing.assert_allclose(1.0 - flow.numpy()[0, 0], 1e-2, rtol=1e-3)
    np.testing.assert_allclose(1.0 - proxy.numpy()[0, 0], 1e-1, rtol=1e-3)
    np.testing.assert_allclose(1.0 - backbone.numpy()[0, 0], 1e-3, rtol=1e-3)


def test_warmup_freezes_backbone_then_releases_it():
    flow, proxy, backbone = _variables()
    opt = make_optimizer(learning_rate=1e-3, weight_decay=0.0, warmup_steps=2)
    grads = [np.full((1, 1), 0.5, "float32")] * 3
    for _ in range(2):
        opt.apply(grads, [flow, proxy, backbone])
    assert backbone.numpy()[0, 0] == 1.0 and flow.numpy()[0, 0] < 1.0
    opt.apply(grads, [flow, proxy, backbone])
    assert backbone.numpy()[0, 0] < 1.0


def test_weight_decay_uses_the_group_learning_rate():
    flow, proxy, backbone = _variables()
    opt = make_optimizer(learning_rate=1e-2, head_lr_multiplier=10.0, weight_decay=0.5)
    zeros = [np.zeros((1, 1), "float32")] * 3
    opt.apply(zeros, [flow, proxy, backbone])
    np.testing.assert_allclose(flow.numpy()[0, 0], 1.0 - 0.5 * 1e-1, rtol=1e-5)
    np.testing.assert_allclose(backbone.numpy()[0, 0], 1.0 - 0.5 * 1e-2, rtol=1e-5)


def test_linear_decay_schedule_and_config_round_trip():
    opt = make_optimizer(learning_rate=1e-4, total_steps=100)
    schedule = opt._learning_rate
    np.testing.assert_allclose(float(schedule(0)), 1e-4)
    np.testing.assert_allclose(float(schedule(50)), 5e-5, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(100)), 0.0, atol=1e-12)
    clone = GroupAdamW.from_config(opt.get_config())
    assert clone.param_groups == opt.param_groups
    assert clone.group_for_path("model/dreg_loss_max/proxies") == (10.0, 0)
    assert clone.group_for_path("conv1/kernel") == (1.0, 0)


def test_bad_pattern_fails_early():
    with pytest.raises(Exception):
        GroupAdamW(param_groups=[{"pattern": "(unclosed"}])


def _numpy_adam(gradients, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Keras' Adam update of a weight starting at 1.0, step by step (no weight decay)."""
    theta, m, v = 1.0, 0.0, 0.0
    for t, g in enumerate(gradients, start=1):
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        lr_t = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        theta -= lr_t * m / (np.sqrt(v) + epsilon)
    return theta


def test_clipvalue_clips_each_gradient_before_the_adam_update():
    """Official Proxy Anchor clips gradients by value at 10: steps of 50 then 5 must act like 10 then 5."""
    steps = [50.0, 5.0]
    expected_clipped = _numpy_adam([10.0, 5.0], lr=1e-2)
    unclipped = _numpy_adam(steps, lr=1e-2)
    assert abs(expected_clipped - unclipped) > 1e-3  # the test can tell clipping from no clipping
    for clipvalue, expected in ((10.0, expected_clipped), (None, unclipped)):
        flow, proxy, backbone = _variables()
        opt = make_optimizer(learning_rate=1e-2, head_lr_multiplier=1.0, proxy_lr_multiplier=1.0,
                             weight_decay=0.0, clipvalue=clipvalue)
        for g in steps:
            opt.apply([np.full((1, 1), g, "float32")] * 3, [flow, proxy, backbone])
        for variable in (flow, proxy, backbone):
            np.testing.assert_allclose(variable.numpy()[0, 0], expected, rtol=1e-5)
    assert make_optimizer(clipvalue=10).get_config()["clipvalue"] == 10.0
    assert GroupAdamW.from_config(make_optimizer(clipvalue=10).get_config()).clipvalue == 10.0
    assert make_optimizer().get_config()["clipvalue"] is None


@pytest.mark.parametrize("clipvalue", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_clipvalue_is_rejected(clipvalue):
    with pytest.raises(ValueError, match="clipvalue"):
        make_optimizer(clipvalue=clipvalue)


def test_head_warmup_ramps_only_the_flow_heads_linearly():
    """Adam steps: the heads' k-th step uses lr·min(1, k/R); proxies and backbone the full lr."""
    ramp = 4
    grads = [1.0, -0.5, 2.0, 1.5, -1.0, 0.7]
    flow, proxy, backbone = _variables()
    opt = make_optimizer(learning_rate=1e-2, head_lr_multiplier=1.0, proxy_lr_multiplier=1.0, weight_decay=0.0,
                         head_warmup_steps=ramp)
    for g in grads:
        opt.apply([np.full((1, 1), g, "float32")] * 3, [flow, proxy, backbone])
    # independent reference: Keras' Adam with a per-step learning rate
    theta, m, v = 1.0, 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        lr_t = 1e-2 * min(1.0, t / ramp) * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        theta -= lr_t * m / (np.sqrt(v) + 1e-7)
    np.testing.assert_allclose(flow.numpy()[0, 0], theta, rtol=1e-5)
    np.testing.assert_allclose(proxy.numpy()[0, 0], _numpy_adam(grads, lr=1e-2), rtol=1e-5)
    np.testing.assert_allclose(backbone.numpy()[0, 0], _numpy_adam(grads, lr=1e-2), rtol=1e-5)
    assert abs(theta - _numpy_adam(grads, lr=1e-2)) > 1e-3  # the ramp is visible
    clone = GroupAdamW.from_config(opt.get_config())
    assert clone.ramp_for_path("model/dreg_flow_min/coupling_0/net/out/kernel") == ramp
    assert clone.ramp_for_path("conv1/kernel") == 0
    with pytest.raises(ValueError, match="head_warmup_steps"):
        make_optimizer(head_warmup_steps=-1)
