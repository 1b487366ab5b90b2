"""Determinant regulariser R (Eq. 6, 7/10): numpy parity and optimisation direction."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from detreg_keras.flows import NICEFlow, RealNVPFlow
from detreg_keras.regularizers import DeterminantRegularizer, determinant_regularizer, per_sample_regularizer


def _numpy_r(jacobian_diagonals: list[np.ndarray], form: str) -> np.ndarray:
    """R(x) = Σ_k (1/d) Σ_t log(1 + |J_tt|)  or  Σ_k (1/d) Σ_t log|J_tt|, per sample."""
    total = 0.0
    for diag in jacobian_diagonals:  # each [B, d]
        d = diag.shape[-1]
        terms = np.log1p(np.abs(diag)) if form == "log1p" else np.log(np.abs(diag))
        total = total + terms.sum(-1) / d
    return total


def _autodiff_block_diagonals(flow, x):
    """Jacobian diagonal of every triangular block, from tf autodiff."""
    diags, h = [], x
    for layer, perm in flow._steps():
        with tf.GradientTape() as tape:
            tape.watch(h)
            out = layer(h)
        jac = tape.batch_jacobian(out, h).numpy().astype("float64")
        diags.append(np.diagonal(jac, axis1=1, axis2=2))
        h = out if perm is None else tf.gather(out, perm, axis=-1)
    return diags


@pytest.mark.parametrize("cls", [RealNVPFlow, NICEFlow])
@pytest.mark.parametrize("form", ["log1p", "logdet"])
def test_regularizer_equals_numpy_from_autodiff_jacobians(cls, form):
    flow = cls(num_couplings=3, hidden_units=(16,))
    flow.build((None, 6))
    rng = np.random.default_rng(0)
    for w in flow.trainable_weights:
        w.assign(w.numpy() + 0.4 * rng.standard_normal(w.shape).astype("float32"))
    x = tf.random.normal((7, 6), seed=1)
    _, log_diag = flow.forward_with_log_diag(x)
    reference = _numpy_r(_autodiff_block_diagonals(flow, x), form)
    np.testing.assert_allclose(per_sample_regularizer(log_diag, form).numpy(), reference, atol=1e-5)
    np.testing.assert_allclose(determinant_regularizer(log_diag, form).numpy(), reference.mean(), atol=1e-5)


def test_hand_computed_values_and_mask():
    # one block, d = 2: J diagonals (1, e) and (e^-1, 1)
    log_diag = tf.constant([[0.0, 1.0], [-1.0, 0.0]])
    e = np.e
    log1p = np.array([(np.log(2) + np.log(1 + e)) / 2, (np.log(1 + 1 / e) + np.log(2)) / 2])
    np.testing.assert_allclose(per_sample_regularizer(log_diag, "log1p").numpy(), log1p, rtol=1e-6)
    np.testing.assert_allclose(per_sample_regularizer(log_diag, "logdet").numpy(), [0.5, -0.5], rtol=1e-6)
    # the log-det form is (1/d) log|det J|
    np.testing.assert_allclose(determinant_regularizer(log_diag, "logdet").numpy(), 0.0, atol=1e-7)
    masked = determinant_regularizer(log_diag, "log1p", mask=tf.constant([True, False]))
    np.testing.assert_allclose(masked.numpy(), log1p[0], rtol=1e-6)
    empty = determinant_regularizer(log_diag, "log1p", mask=tf.constant([False, False]))
    assert empty.numpy() == 0.0


def test_log1p_form_is_stable_for_extreme_log_diagonals():
    log_diag = tf.constant([[[-200.0, 200.0, 0.0]]])
    value = per_sample_regularizer(log_diag, "log1p").numpy()
    np.testing.assert_allclose(value, [(0.0 + 200.0 + np.log(2)) / 3], rtol=1e-6)
    with tf.GradientTape() as tape:
        tape.watch(log_diag)
        out = per_sample_regularizer(log_diag, "log1p")
    assert np.all(np.isfinite(tape.gradient(out, log_diag).numpy()))


@pytest.mark.parametrize("role,direction", [("min", -1), ("max", +1)])
@pytest.mark.parametrize("cls", [RealNVPFlow, NICEFlow])
def test_min_and_max_terms_move_the_jacobian_diagonal(role, direction, cls):
    """Optimising sign·λ·R alone shrinks (min) or grows (max) the Jacobian diagonal."""
    flow = cls(num_couplings=2, hidden_units=(16,))
    flow.build((None, 8))
    reg = DeterminantRegularizer(weight=1.0, role=role)
    x = tf.random.normal((32, 8), seed=2)
    opt = keras.optimizers.Adam(1e-2)

    def mean_log_diag():
        return float(tf.reduce_mean(tf.reduce_sum(flow.forward_with_log_diag(x)[1], axis=[1, 2])))

    before = mean_log_diag()
    for _ in range(15):
        with tf.GradientTape() as tape:
            penalty, _ = reg.penalty(flow.forward_with_log_diag(x)[1])
        grads = tape.gradient(penalty, flow.trainable_weights)
        opt.apply([g if g is not None else tf.zeros_like(v) for g, v in zip(grads, flow.trainable_weights)], flow.trainable_weights)
    after = mean_log_diag()
    assert direction * (after - before) > 0.5, (before, after)


def test_layer_adds_signed_weighted_loss_and_round_trips():
    log_diag = tf.random.normal((4, 2, 6), seed=3)
    r = determinant_regularizer(log_diag).numpy()
    for role, sign in (("min", 1.0), ("max", -1.0)):
        layer = DeterminantRegularizer(weight=0.05, role=role)
        value = layer(log_diag)
        np.testing.assert_allclose(value.numpy(), r, rtol=1e-6)
        assert len(layer.losses) == 1
        np.testing.assert_allclose(layer.losses[0].numpy(), sign * 0.05 * r, rtol=1e-6)
        clone = DeterminantRegularizer.from_config(layer.get_config())
        assert (clone.weight, clone.role, clone.form, clone.coupling_reduction) == (0.05, role, "log1p", "sum")
    mean_layer = DeterminantRegularizer(weight=0.05, coupling_reduction="mean")
    np.testing.assert_allclose(mean_layer(log_diag).numpy(), r / 2, rtol=1e-6)  # K = 2 blocks
    np.testing.assert_allclose(mean_layer.losses[0].numpy(), 0.05 * r / 2, rtol=1e-6)
    assert DeterminantRegularizer.from_config(mean_layer.get_config()).coupling_reduction == "mean"


def test_bad_arguments():
    with pytest.raises(ValueError, match="role"):
        DeterminantRegularizer(role="up")
    with pytest.raises(ValueError, match="form"):
        DeterminantRegularizer(form="frobenius")
    with pytest.raises(ValueError, match=">= 0"):
        DeterminantRegularizer(weight=-1.0)
    for weight in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            DeterminantRegularizer(weight=weight)
    with pytest.raises(ValueError, match="coupling_reduction"):
        DeterminantRegularizer(coupling_reduction="max")
    with pytest.raises(ValueError, match="coupling_reduction"):
        per_sample_regularizer(tf.zeros((2, 3)), coupling_reduction="median")
    with pytest.raises(ValueError, match="shape"):
        per_sample_regularizer(tf.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="Unknown regularizer form"):
        per_sample_regularizer(tf.zeros((2, 3)), form="x")


@pytest.mark.parametrize("cls,blocks", [(RealNVPFlow, 12), (NICEFlow, 13)])
def test_identity_head_scale_is_k_log2_summed_and_log2_averaged(cls, blocks):
    """The documented scale of R: a fresh (identity-Jacobian-diagonal) K = 12 head gives K·log 2 or log 2."""
    flow = cls(num_couplings=12, hidden_units=(8,))
    flow.build((None, 10))
    _, log_diag = flow.forward_with_log_diag(tf.random.normal((4, 10), seed=5))
    assert log_diag.shape[1] == blocks  # NICE: 12 couplings and the diagonal scale
    np.testing.assert_allclose(determinant_regularizer(log_diag).numpy(), blocks * np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(determinant_regularizer(log_diag, coupling_reduction="mean").numpy(), np.log(2.0),
                               rtol=1e-6)
    np.testing.assert_allclose(determinant_regularizer(log_diag, "logdet").numpy(), 0.0, atol=1e-7)


def test_logdet_form_is_eq6_divided_by_2d():
    """Eq. 6 is log Π λ_i² = 2 log|det J|; the "logdet" form (sum over blocks) is (1/d) log|det J|."""
    flow = RealNVPFlow(num_couplings=3, hidden_units=(16,))
    flow.build((None, 6))
    rng = np.random.default_rng(4)
    for w in flow.trainable_weights:
        w.assign(w.numpy() + 0.4 * rng.standard_normal(w.shape).astype("float32"))
    x = tf.random.normal((5, 6), seed=6)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y, log_diag = flow.forward_with_log_diag(x)
    jac = tape.batch_jacobian(y, x).numpy().astype("float64")
    singular_values = np.linalg.svd(jac, compute_uv=False)
    eq6 = np.log(np.prod(singular_values**2, axis=1))
    assert np.abs(eq6).max() > 0.1
    np.testing.assert_allclose(per_sample_regularizer(log_diag, "logdet").numpy(), eq6 / (2 * 6), atol=1e-5)
    # ... and a block's triangular diagonal entries are not its singular values (only their product agrees)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y0 = flow.couplings[0](x)
    block = tape.batch_jacobian(y0, x).numpy().astype("float64")
    diagonal, block_sv = np.exp(log_diag.numpy()[:, 0].astype("float64")), np.linalg.svd(block, compute_uv=False)
    np.testing.assert_allclose(diagonal.prod(axis=1), block_sv.prod(axis=1), rtol=1e-4)
    assert np.abs(np.sort(diagonal, axis=1) - np.sort(block_sv, axis=1)).max() > 0.1
