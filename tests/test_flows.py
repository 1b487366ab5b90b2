"""Flow heads: tfp forward pass, log-det and Jacobian diagonals against autodiff and numpy, invertibility."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from detreg_keras import flows as flows_module
from detreg_keras.flows import (
    AdditiveCoupling,
    AffineCoupling,
    CouplingNetwork,
    DiagonalScale,
    NICEFlow,
    RealNVPFlow,
    build_flow,
)

tfb = tfp.bijectors

FLOWS = [RealNVPFlow, NICEFlow]


def _perturb(layer, scale=0.3, seed=0):
    rng = np.random.default_rng(seed)
    for w in layer.trainable_weights:
        w.assign(w.numpy() + scale * rng.standard_normal(w.shape).astype("float32"))


def _make(cls, dim=6, **kw):
    flow = cls(num_couplings=kw.pop("num_couplings", 3), hidden_units=kw.pop("hidden_units", (16,)), **kw)
    flow.build((None, dim))
    return flow


def _autodiff_jacobian(fn, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    return tape.batch_jacobian(y, x).numpy().astype("float64")


@pytest.mark.parametrize("cls", FLOWS)
@pytest.mark.parametrize("perturbed", [False, True])
def test_log_det_matches_autodiff_slogdet(cls, perturbed):
    flow = _make(cls, dim=6)
    if perturbed:
        _perturb(flow)
    x = tf.random.normal((8, 6), seed=3)
    jac = _autodiff_jacobian(flow, x)
    _, reference = np.linalg.slogdet(jac)
    ours = flow.log_det_jacobian(x).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    if perturbed:  # the test must be able to fail: a perturbed head is not volume preserving
        assert np.abs(reference).max() > 1e-2


@pytest.mark.parametrize("cls", FLOWS)
def test_per_coupling_log_diag_equals_autodiff_diagonal(cls):
    """log_diag[:, k] is log|diag| of the k-th block's own Jacobian (in its coordinates)."""
    flow = _make(cls, dim=6)
    _perturb(flow, seed=1)
    x = tf.random.normal((5, 6), seed=4)
    _, log_diag = flow.forward_with_log_diag(x)
    h = x
    for k, (layer, perm) in enumerate(flow._steps()):
        jac = _autodiff_jacobian(layer, h)
        np.testing.assert_allclose(log_diag[:, k].numpy(), np.log(np.abs(np.diagonal(jac, axis1=1, axis2=2))), atol=1e-5)
        # the block is triangular: its determinant is the product of the diagonal (Eq. 9)
        _, block_logdet = np.linalg.slogdet(jac)
        np.testing.assert_allclose(block_logdet, log_diag[:, k].numpy().sum(-1), atol=1e-5)
        h = layer(h)
        if perm is not None:
            h = tf.gather(h, perm, axis=-1)


@pytest.mark.parametrize("cls", FLOWS)
def test_inverse_of_forward_is_identity(cls):
    flow = _make(cls, dim=8)
    _perturb(flow, seed=2)
    x = tf.random.normal((16, 8), seed=5)
    y = flow(x)
    assert np.abs(y.numpy() - x.numpy()).max() > 1e-2
    np.testing.assert_allclose(flow.inverse(y).numpy(), x.numpy(), atol=1e-4)


@pytest.mark.parametrize("cls", FLOWS)
def test_matches_tfp_bijector_chain(cls):
    flow = _make(cls, dim=6)
    _perturb(flow, seed=3)
    x = tf.random.normal((4, 6), seed=6)
    y, log_diag = flow.forward_with_log_diag(x)
    bijector = flow.bijector()
    np.testing.assert_allclose(bijector.forward(x).numpy(), y.numpy(), atol=1e-5)
    np.testing.assert_allclose(
        bijector.forward_log_det_jacobian(x, event_ndims=1).numpy(), log_diag.numpy().sum((1, 2)), atol=1e-4
    )
    np.testing.assert_allclose(bijector.inverse(y).numpy(), x.numpy(), atol=1e-4)


def test_fresh_heads_start_as_identity_and_nice_has_extra_scale_block():
    x = tf.random.normal((3, 6), seed=7)
    realnvp, nice = _make(RealNVPFlow), _make(NICEFlow)
    # zero-initialised output layers: each coupling is the identity, so the flow is a permutation
    assert sorted(realnvp(x).numpy()[0].round(5)) == sorted(x.numpy()[0].round(5))
    assert realnvp.forward_with_log_diag(x)[1].shape == (3, 3, 6)
    assert nice.forward_with_log_diag(x)[1].shape == (3, 4, 6)
    assert isinstance(nice.diagonal_layers[-1], DiagonalScale)


def test_nice_determinant_comes_only_from_diagonal_scale():
    flow = _make(NICEFlow)
    _perturb(flow, seed=4)
    x = tf.random.normal((5, 6), seed=8)
    _, log_diag = flow.forward_with_log_diag(x)
    np.testing.assert_allclose(log_diag[:, :-1].numpy(), 0.0)
    np.testing.assert_allclose(log_diag[:, -1].numpy(), np.broadcast_to(flow.scale.log_scale().numpy(), (5, 6)), atol=1e-6)


def test_log_scale_is_bounded():
    flow = _make(RealNVPFlow, log_scale_bound=1.5)
    _perturb(flow, scale=50.0, seed=5)
    _, log_diag = flow.forward_with_log_diag(tf.random.normal((32, 6), stddev=100.0, seed=9))
    assert np.all(np.isfinite(log_diag.numpy()))
    assert np.abs(log_diag.numpy()).max() <= 1.5


@pytest.mark.parametrize("cls", FLOWS)
def test_config_round_trip_and_saved_permutations(cls, tmp_path):
    flow = _make(cls, dim=6, permutation_seed=11)
    _perturb(flow, seed=6)
    clone = cls.from_config(flow.get_config())
    clone.build((None, 6))
    clone.set_weights(flow.get_weights())
    x = tf.random.normal((4, 6), seed=10)
    np.testing.assert_allclose(clone(x).numpy(), flow(x).numpy(), atol=1e-6)
    inputs = keras.Input((6,))
    model = keras.Model(inputs, flow(inputs))
    model.save(tmp_path / "flow.keras")
    loaded = keras.models.load_model(tmp_path / "flow.keras")
    np.testing.assert_allclose(loaded(x).numpy(), flow(x).numpy(), atol=1e-6)


def test_permutations_depend_on_seed_and_are_permutations():
    a, b = _make(RealNVPFlow, dim=10, permutation_seed=0), _make(RealNVPFlow, dim=10, permutation_seed=1)
    for perm in a.permutations:
        assert sorted(perm.numpy().tolist()) == list(range(10))
    assert any((pa.numpy() != pb.numpy()).any() for pa, pb in zip(a.permutations, b.permutations))


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="at least 2"):
        AffineCoupling(hidden_units=(4,)).build((None, 1))
    with pytest.raises(ValueError, match="num_couplings"):
        RealNVPFlow(num_couplings=0)
    with pytest.raises(ValueError, match=">= 2"):
        RealNVPFlow(num_couplings=2).build((None, 1))
    with pytest.raises(ValueError, match="log_scale_bound"):
        AdditiveCoupling(log_scale_bound=0.0)
    for bound in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="log_scale_bound"):
            RealNVPFlow(num_couplings=2, log_scale_bound=bound)
        with pytest.raises(ValueError, match="log_scale_bound"):
            DiagonalScale(log_scale_bound=bound)
    with pytest.raises(ValueError, match="num_couplings"):
        NICEFlow(num_couplings=-3)
    with pytest.raises(ValueError, match="num_couplings"):
        RealNVPFlow(num_couplings=2.5)
    with pytest.raises(ValueError, match="hidden_units"):
        RealNVPFlow(num_couplings=2, hidden_units=(8, 0))
    with pytest.raises(ValueError, match=">= 2"):
        NICEFlow(num_couplings=2).build((None, None))
    with pytest.raises(ValueError, match="Unknown flow type"):
        build_flow("glow")
    with pytest.raises(ValueError, match="Build the flow"):
        RealNVPFlow(num_couplings=2).bijector()


def test_flow_computes_in_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        flow = RealNVPFlow(num_couplings=2, hidden_units=(8,))
        y, log_diag = flow.forward_with_log_diag(tf.random.normal((2, 4), dtype=tf.float16))
        flow_out = flow(tf.random.normal((2, 4), dtype=tf.float16))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert y.dtype == tf.float32 and log_diag.dtype == tf.float32 and flow_out.dtype == tf.float32


# ----------------------------------------------------------------------------------------------
# Independent references: a numpy re-implementation of the forward pass, and autodiff in float64


def _numpy_forward(flow, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The flow written out in numpy (float64) from its weights: ``(y, log|J_tt| [B, K, D])``."""
    h = np.asarray(x, np.float64)
    diags = []
    for layer, perm in flow._steps():
        bound = layer.log_scale_bound
        if isinstance(layer, DiagonalScale):
            s = bound * np.tanh(layer.raw_log_scale.numpy().astype(np.float64) / bound)
            h = h * np.exp(s)
            diags.append(np.broadcast_to(s, h.shape))
        else:
            m = layer.num_masked
            x0, x1 = h[:, :m], h[:, m:]
            a = x0
            for dense in layer.net.hidden:
                a = np.maximum(a @ dense.kernel.numpy().astype(np.float64) + dense.bias.numpy(), 0.0)
            out = a @ layer.net.out.kernel.numpy().astype(np.float64) + layer.net.out.bias.numpy()
            if layer.with_scale:
                shift, raw = out[:, : h.shape[1] - m], out[:, h.shape[1] - m :]
                if layer.shift_bound is not None:
                    shift = layer.shift_bound * np.tanh(shift / layer.shift_bound)
                s = bound * np.tanh(raw / bound)
                h = np.concatenate([x0, x1 * np.exp(s) + shift], axis=1)
                diags.append(np.concatenate([np.zeros_like(x0), s], axis=1))
            else:
                if layer.shift_bound is not None:
                    out = layer.shift_bound * np.tanh(out / layer.shift_bound)
                h = np.concatenate([x0, x1 + out], axis=1)
                diags.append(np.zeros_like(h))
        if perm is not None:
            h = h[:, perm.numpy()]
    return h, np.stack(diags, axis=1)


def _realistic(cls, dim, dtype, seed=0, num_couplings=12, hidden=128, scale=0.02):
    """A K = 12 head at a realistic size, every weight perturbed away from the identity.

    (A larger perturbation, 0.05, makes the d = 512 Jacobian so ill-conditioned, cond ≈ 2e14,
    that float64 slogdet itself is off by 4e-6, while at 0.02 cond ≈ 1e2.)
    """
    flow = cls(num_couplings=num_couplings, hidden_units=(hidden,), dtype=dtype, permutation_seed=seed)
    flow.build((None, dim))
    rng = np.random.default_rng(seed)
    for w in flow.trainable_weights:
        w.assign(w.numpy() + scale * rng.standard_normal(w.shape).astype(w.dtype))
    return flow


@pytest.mark.parametrize("dim", [128, 512])
@pytest.mark.parametrize("cls", FLOWS)
def test_realistic_size_log_det_matches_float64_autodiff_slogdet(cls, dim):
    """d = 128 / 512, K = 12, perturbed weights: the tfp head against slogdet of the autodiff Jacobian."""
    flow64 = _realistic(cls, dim, "float64")
    x = tf.random.stateless_normal((3, dim), seed=(dim, 1), dtype=tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y, log_diag = flow64.forward_with_log_diag(x)
    jac = tape.batch_jacobian(y, x).numpy()
    sign, reference = np.linalg.slogdet(jac)
    ours = log_diag.numpy().sum((1, 2))
    assert np.all(sign > 0)
    assert np.abs(reference).min() > 0.1  # far from volume preserving: the comparison can fail
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-10)
    # y and every block's log|J_tt| against the numpy re-implementation
    y_np, log_diag_np = _numpy_forward(flow64, x.numpy())
    np.testing.assert_allclose(y.numpy(), y_np, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(log_diag.numpy(), log_diag_np, rtol=1e-10, atol=1e-10)
    # the default float32 head with the same weights (what training uses)
    flow32 = cls(num_couplings=12, hidden_units=(128,), permutation_seed=0)
    flow32.build((None, dim))
    flow32.set_weights([w.astype(np.float32) if w.dtype == np.float64 else w for w in flow64.get_weights()])
    ours32 = flow32.log_det_jacobian(tf.cast(x, tf.float32)).numpy()
    np.testing.assert_allclose(ours32, reference, rtol=1e-4)


@pytest.mark.parametrize("cls", FLOWS)
def test_realistic_size_per_block_diagonals_match_autodiff(cls):
    """d = 128, K = 12: log_diag[:, k] is log|diag| of the k-th block's own Jacobian (float64 autodiff)."""
    flow = _realistic(cls, 128, "float64", seed=1)
    x = tf.random.stateless_normal((2, 128), seed=(7, 7), dtype=tf.float64)
    _, log_diag = flow.forward_with_log_diag(x)
    h = x
    for k, (layer, perm) in enumerate(flow._steps()):
        jac = _autodiff_jacobian(layer, h)
        np.testing.assert_allclose(log_diag[:, k].numpy(), np.log(np.abs(np.diagonal(jac, axis1=1, axis2=2))),
                                   atol=1e-10)
        assert np.allclose(np.triu(jac, 1), 0.0) or np.allclose(np.tril(jac, -1), 0.0)  # triangular block
        h = layer(h)
        if perm is not None:
            h = tf.gather(h, perm, axis=-1)
    assert np.abs(log_diag.numpy()).max() > 0.05 or cls is NICEFlow


class _Spy:
    """Counts calls of a method and keeps what it returned."""

    def __init__(self, monkeypatch, owner, name):
        self.calls, self.outputs, self.owners = 0, [], []
        original = getattr(owner, name)

        def wrapper(obj, *args, **kwargs):
            self.calls += 1
            out = original(obj, *args, **kwargs)
            self.outputs.append(out)
            self.owners.append(obj)
            return out

        monkeypatch.setattr(owner, name, wrapper)


@pytest.mark.parametrize("cls", FLOWS)
def test_forward_runs_through_tfp_bijectors_with_one_network_pass_per_coupling(cls, monkeypatch):
    flow = _make(cls, dim=6, num_couplings=4)
    _perturb(flow, seed=8)
    nets = _Spy(monkeypatch, CouplingNetwork, "call")
    forwards = _Spy(monkeypatch, tfb.Bijector, "forward")
    couplings = _Spy(monkeypatch, tfb.RealNVP, "_forward")
    permutes = _Spy(monkeypatch, tfb.Permute, "_forward")
    builds = _Spy(monkeypatch, flows_module.FlowHead, "_chain")
    x = tf.random.normal((5, 6), seed=11)
    y, log_diag = flow.forward_with_log_diag(x)
    assert nets.calls == 4 and couplings.calls == 4 and permutes.calls == 3 and builds.calls == 1
    chain = builds.outputs[0]
    assert isinstance(chain, tfb.Bijector) and type(chain).__name__.endswith("Chain")
    # the returned output *is* what the head's tfp chain's forward returned (the outermost, last to return)
    assert forwards.owners[-1] is chain and y is forwards.outputs[-1]
    y_np, log_diag_np = _numpy_forward(flow, x.numpy())
    np.testing.assert_allclose(y.numpy(), y_np, atol=1e-5)
    np.testing.assert_allclose(log_diag.numpy(), log_diag_np, atol=1e-5)
    assert flow(x) is forwards.outputs[-1] and forwards.owners[-1] is builds.outputs[1] and nets.calls == 8


def test_fit_step_evaluates_each_coupling_network_once_through_tfp(monkeypatch):
    """One eager DRegModel training step: 2 heads x K couplings, each network run once, by tfb.RealNVP."""
    from detreg_keras.model import DRegModel

    model = DRegModel(num_classes=3, backbone="small_cnn", image_size=8, channels=1, embedding_dim=8,
                      num_couplings=3, hidden_units=8)
    model.compile(run_eagerly=True)
    x = np.random.default_rng(0).uniform(0, 255, (6, 8, 8, 1)).astype("float32")
    y = np.array([0, 0, 1, 1, 2, 2], "int32")
    model.train_on_batch(x[:2], y[:2])  # build
    nets = _Spy(monkeypatch, CouplingNetwork, "call")
    couplings = _Spy(monkeypatch, tfb.RealNVP, "_forward")
    records = _Spy(monkeypatch, flows_module._Coupling, "log_diag")
    model.train_on_batch(x, y)
    assert nets.calls == 6 and couplings.calls == 6 and records.calls == 6


def test_flow_fit_in_tf_function_over_steps_and_after_reload(tmp_path):
    """tf.function training across several steps, then save/load and more steps (TFP cache pitfall)."""
    inputs = keras.Input((6,))
    flow = RealNVPFlow(num_couplings=3, hidden_units=(8,))
    model = keras.Model(inputs, flow(inputs))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x = np.random.default_rng(0).standard_normal((32, 6)).astype("float32")
    target = x[:, ::-1] * 1.5
    first = model.fit(x, target, batch_size=8, epochs=3, verbose=0).history["loss"]
    assert first[-1] < first[0]
    model.save(tmp_path / "flow.keras")
    loaded = keras.models.load_model(tmp_path / "flow.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    again = loaded.fit(x, target, batch_size=8, epochs=2, verbose=0).history["loss"]
    assert np.all(np.isfinite(again)) and again[-1] < first[0]


def test_layout_version_is_saved_and_checked():
    flow = _make(RealNVPFlow)
    config = flow.get_config()
    assert config["layout_version"] == flows_module.LAYOUT_VERSION == 2
    old = {k: v for k, v in config.items() if k != "layout_version"}  # written before versioning
    clone = RealNVPFlow.from_config(old)
    clone.build((None, 6))
    clone.set_weights(flow.get_weights())
    x = tf.random.normal((3, 6), seed=12)
    np.testing.assert_array_equal(clone(x).numpy(), flow(x).numpy())
    with pytest.raises(ValueError, match="flow layout version 7 .*newer detreg_keras"):
        NICEFlow.from_config({**config, "layout_version": 7})


# ----------------------------------------------------------------------------------------------
# Bounded shifts (issue 13): t = b·tanh(t̂/b)


@pytest.mark.parametrize("cls", FLOWS)
def test_bounded_shifts_against_numpy_and_autodiff(cls):
    """A head with shift_bound: y and log|J_tt| against the float64 numpy reference, log-det against slogdet."""
    flow = cls(num_couplings=4, hidden_units=(16,), shift_bound=0.3, dtype="float64", permutation_seed=3)
    flow.build((None, 8))
    _perturb(flow, scale=2.0, seed=4)  # large raw shifts: the bound is active
    x = tf.random.stateless_normal((5, 8), seed=(4, 2), dtype=tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y, log_diag = flow.forward_with_log_diag(x)
    y_np, log_diag_np = _numpy_forward(flow, x.numpy())
    np.testing.assert_allclose(y.numpy(), y_np, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(log_diag.numpy(), log_diag_np, rtol=1e-10, atol=1e-10)
    _, reference = np.linalg.slogdet(tape.batch_jacobian(y, x).numpy())
    np.testing.assert_allclose(log_diag.numpy().sum((1, 2)), reference, atol=1e-9)
    np.testing.assert_allclose(flow.inverse(y).numpy(), x.numpy(), atol=1e-9)
    # the unbounded head with the same weights differs: the bound is doing something
    free = cls(num_couplings=4, hidden_units=(16,), dtype="float64", permutation_seed=3)
    free.build((None, 8))
    free.set_weights(flow.get_weights())
    assert np.abs(free(x).numpy() - y.numpy()).max() > 0.1


def test_each_bounded_shift_stays_within_its_bound():
    coupling = AffineCoupling(hidden_units=(8,), shift_bound=0.25)
    coupling.build((None, 6))
    _perturb(coupling, scale=20.0, seed=1)
    x = tf.random.normal((64, 6), stddev=50.0, seed=2)
    shift, _ = coupling._shift_and_log_scale(x[:, : coupling.num_masked])
    assert np.abs(shift.numpy()).max() <= 0.25
    assert np.abs(shift.numpy()).max() > 0.2  # saturated, not trivially small


@pytest.mark.parametrize("cls", FLOWS)
def test_shift_bound_config_round_trip_and_default(cls, tmp_path):
    flow = _make(cls, dim=6, shift_bound=0.5)
    _perturb(flow, seed=7)
    config = flow.get_config()
    assert config["shift_bound"] == 0.5 and all(c.shift_bound == 0.5 for c in flow.couplings)
    inputs = keras.Input((6,))
    model = keras.Model(inputs, flow(inputs))
    model.save(tmp_path / "bounded.keras")
    loaded = keras.models.load_model(tmp_path / "bounded.keras")
    x = tf.random.normal((4, 6), seed=13)
    np.testing.assert_allclose(loaded(x).numpy(), flow(x).numpy(), atol=1e-6)
    # configs written before the option (no key) mean unbounded shifts
    old = {k: v for k, v in config.items() if k != "shift_bound"}
    assert cls.from_config(old).shift_bound is None
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="shift_bound"):
            cls(num_couplings=2, shift_bound=bad)
