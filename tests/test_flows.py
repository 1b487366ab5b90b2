"""Flow heads: log-det and Jacobian diagonals against autodiff, invertibility, tfp parity."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import keras

from detreg_keras.flows import AdditiveCoupling, AffineCoupling, DiagonalScale, NICEFlow, RealNVPFlow, build_flow

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
