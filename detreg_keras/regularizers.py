"""The determinant regulariser R of the DReg paper (Eq. 6, 7, 10) and its Keras layer.

What R is, exactly
------------------
A flow head (:mod:`detreg_keras.flows`) is a chain of ``K`` triangular blocks
(the couplings; for NICE the ``num_couplings`` shift-only couplings *and* the
diagonal scale, ``K = num_couplings + 1``) with permutations in between. The
head's Jacobian is ``J = J^(K) P_{K-1} ⋯ P_1 J^(1)``; each block ``J^(k)`` is
triangular with diagonal ``J^(k)_tt`` (Eq. 9), and ``J`` itself is not
triangular. For one sample ``x`` with ``d`` features, this module computes the
per-block Eq. 10 term

    r_k(x) = (1/d) Σ_t log(1 + |J^(k)_tt|)                    ("log1p", Eq. 7/10)
    r_k(x) = (1/d) Σ_t log|J^(k)_tt|                          ("logdet", Eq. 6 up to scale)

and combines the blocks with ``coupling_reduction``:

* ``"sum"`` (default): ``R(x) = Σ_k r_k(x)``. An identity head gives
  ``K·log 2`` (8.32 at ``K = 12``) in the log1p form, so the effective weight
  of ``λ`` grows with ``K``: against Eq. 7 read on one triangular map
  (identity: ``log 2``), λ = 0.05 acts like ``K·0.05 = 0.6`` at ``K = 12``.
* ``"mean"``: ``R(x) = (1/K) Σ_k r_k(x)``, the average Eq. 10 term of a block
  (identity: ``log 2`` for every ``K``): ``λ`` keeps its meaning when ``K``
  changes.

The default stays ``"sum"`` (the behaviour of detreg_keras 0.1.0). At a
fixed ``K`` the two are one family (``"mean"`` with ``K·λ`` is ``"sum"`` with
``λ``), so a validation run cannot prefer one to the other; the λ grid of
RESULTS.md is in the ``"sum"`` reading, and ``"mean"`` is the option for
comparing λ across heads with different ``K``.

Relation to the paper's equations
---------------------------------
* Eq. 7 is written with the **singular values** ``λ_i`` of the Jacobian. The
  triangular diagonal entries ``J^(k)_tt`` are *not* the singular values of
  ``J^(k)`` (nor of ``J``): only their product agrees in absolute value,
  ``Π_t |J^(k)_tt| = |det J^(k)| = Π_i λ_i(J^(k))``. Eq. 10 replaces the
  singular values of a triangular map by its diagonal, which is what is
  computed here, block by block; Eq. 7 on the whole head (singular values of
  ``J``) is not computed.
* ``"logdet"``: ``Σ_k r_k = (1/d) Σ_{k,t} log|J^(k)_tt| = (1/d) log|det J|``,
  whereas Eq. 6 is ``R = log Π_i λ_i² = 2 log|det J|``; so the "sum" logdet
  form is Eq. 6 divided by ``2d`` (and by ``2dK`` with "mean"). The sign and
  the optimum are those of Eq. 6; only the scale of λ differs.
* Over a set of samples ``Z``: ``R(Z) = (1/|Z|) Σ_{z ∈ Z} R(z)`` (Sec. 4). In
  the dueling objective (Eq. 11) the minimising head adds ``+λ1·R(Z1)`` and the
  maximising head ``-λ2·R(Z2)``.

NICE: input-independent R
-------------------------
The shift-only couplings of a NICE head have ``J^(k)_tt = 1``; only the learned
diagonal scale ``exp(σ)`` contributes. R then depends on ``σ`` alone, not on the
input: it sends no gradient to the backbone, the embedding layer or the
coupling networks, and the augmented samples ``z_ij`` change nothing (every
sample has the same R). Only Real-NVP heads regularise the map locally.

Both forms are computed from ``log|J_tt|`` (what the flows return): since
``log(1 + |J|) = softplus(log|J|)`` the log1p form is evaluated stably.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

FORMS = ("log1p", "logdet")
REDUCTIONS = ("sum", "mean")
ROLES = {"min": 1.0, "max": -1.0}


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ValueError(f"Unknown {what} {value!r}; expected one of {choices}.")
    return value


def per_sample_regularizer(log_diag: tf.Tensor, form: str = "log1p", coupling_reduction: str = "sum") -> tf.Tensor:
    """Per-sample ``R(x)`` from the Jacobian log-diagonals of the ``K`` blocks (Eq. 10 per block).

    Args:
        log_diag: ``[B, K, d]`` values ``log|J^(k)_tt|`` (``[B, d]`` is read as ``K = 1``).
        form: ``"log1p"`` (Eq. 7/10) or ``"logdet"`` (Eq. 6 divided by ``2d``).
        coupling_reduction: ``"sum"`` (``Σ_k r_k``) or ``"mean"`` (``(1/K) Σ_k r_k``)
            over the blocks; see the module docstring.

    Returns:
        ``[B]`` tensor ``R(x_i)``.
    """
    _check_choice(form, FORMS, "regularizer form")
    _check_choice(coupling_reduction, REDUCTIONS, "coupling_reduction")
    log_diag = tf.convert_to_tensor(log_diag)
    if log_diag.shape.rank == 2:
        log_diag = log_diag[:, None, :]
    if log_diag.shape.rank != 3:
        raise ValueError(f"log_diag must have shape [B, K, d] or [B, d], got {log_diag.shape}.")
    d = tf.cast(tf.shape(log_diag)[-1], log_diag.dtype)
    terms = tf.math.softplus(log_diag) if form == "log1p" else log_diag
    per_block = tf.reduce_sum(terms, axis=2) / d  # r_k(x), [B, K]
    if coupling_reduction == "mean":
        return tf.reduce_mean(per_block, axis=1)
    return tf.reduce_sum(per_block, axis=1)


def determinant_regularizer(
    log_diag: tf.Tensor,
    form: str = "log1p",
    mask: tf.Tensor | None = None,
    coupling_reduction: str = "sum",
) -> tf.Tensor:
    """``R(Z)``: the mean of :func:`per_sample_regularizer` over the samples of ``Z`` (Sec. 4).

    Args:
        log_diag: ``[N, K, d]`` Jacobian log-diagonals of the samples of ``Z``.
        form: ``"log1p"`` (Eq. 7/10) or ``"logdet"`` (Eq. 6 divided by ``2d``).
        mask: optional ``[N]`` boolean; samples with ``False`` (e.g. augmented
            points of singleton classes, which have no partner) are left out.
        coupling_reduction: ``"sum"`` or ``"mean"`` over the ``K`` blocks.

    Returns:
        Scalar ``R(Z)``; 0 when no sample is selected.
    """
    per_sample = per_sample_regularizer(log_diag, form, coupling_reduction)
    if mask is None:
        return tf.reduce_mean(per_sample)
    weights = tf.cast(mask, per_sample.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(per_sample * weights), tf.reduce_sum(weights))


def check_weight(weight: float, what: str = "weight (λ)") -> float:
    """A regularisation weight must be a finite number ``>= 0``; the role gives the sign."""
    value = float(weight)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {weight}; the sign comes from the role (min/max).")
    return value


@keras.saving.register_keras_serializable(package="detreg_keras")
class DeterminantRegularizer(keras.layers.Layer):
    """Adds ``sign·λ·R(Z)`` to the model losses through ``add_loss`` (Eq. 11).

    ``role="min"`` adds ``+λ·R`` (the inference head, Eq. 11's ``λ1`` term),
    ``role="max"`` adds ``-λ·R`` (the dueling head, ``λ2``). Calling the layer
    returns the unsigned, unweighted ``R(Z)`` so it can be logged;
    :class:`detreg_keras.model.DRegModel` takes the signed terms from
    ``model.losses``, like any other ``add_loss`` term. Keras 3 clears
    ``layer.losses`` at every outermost call: read them right after the call.

    Args:
        weight: λ, finite and ``>= 0``.
        role: ``"min"`` or ``"max"``.
        form: ``"log1p"`` (Eq. 7/10, default) or ``"logdet"`` (Eq. 6 / 2d).
        coupling_reduction: ``"sum"`` (default) or ``"mean"`` over the blocks
            of the head (see the module docstring: "mean" makes λ independent of K).
    """

    def __init__(
        self,
        weight: float = 0.05,
        role: str = "min",
        form: str = "log1p",
        coupling_reduction: str = "sum",
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}.")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}.")
        self.coupling_reduction = _check_choice(coupling_reduction, REDUCTIONS, "coupling_reduction")
        self.weight = check_weight(weight)
        self.role = role
        self.form = form

    @property
    def sign(self) -> float:
        return ROLES[self.role]

    def penalty(self, log_diag: tf.Tensor, mask: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """Return ``(sign·λ·R(Z), R(Z))`` without touching ``add_loss``."""
        value = determinant_regularizer(log_diag, self.form, mask, self.coupling_reduction)
        return self.sign * self.weight * value, value

    def call(self, log_diag, sample_mask=None):
        """Add ``sign·λ·R(Z)`` with ``add_loss`` and return ``R(Z)``.

        Args:
            log_diag: ``[N, K, d]`` Jacobian log-diagonals of ``Z``.
            sample_mask: optional ``[N]`` boolean sample mask (not named
                ``mask``: Keras reserves that argument for its masking API).
        """
        penalty, value = self.penalty(log_diag, sample_mask)
        self.add_loss(penalty)
        return value

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "weight": self.weight,
                "role": self.role,
                "form": self.form,
                "coupling_reduction": self.coupling_reduction,
            }
        )
        return config
