"""The determinant regulariser R of the DReg paper (Eq. 6, 7, 10) and its Keras layer.

For a flow head made of ``K`` triangular blocks with Jacobian diagonals
``J^(k)_tt`` (see :mod:`detreg_keras.flows`), the per-sample regulariser is

* ``"log1p"`` (default, Eq. 7/10):  ``R(x) = Σ_k (1/d) Σ_t log(1 + |J^(k)_tt|)``
* ``"logdet"`` (Eq. 6):             ``R(x) = Σ_k (1/d) Σ_t log|J^(k)_tt| = (1/d) log|det J|``

and over a set of samples ``Z``: ``R(Z) = (1/|Z|) Σ_{z ∈ Z} R(z)`` (Sec. 4).
In the dueling objective (Eq. 11) the minimising head adds ``+λ1·R(Z1)`` and the
maximising head ``-λ2·R(Z2)``.

Both forms are computed from ``log|J_tt|`` (what the flows return): since
``log(1 + |J|) = softplus(log|J|)`` the log1p form is evaluated stably.
"""

from __future__ import annotations

import keras
import tensorflow as tf

FORMS = ("log1p", "logdet")
ROLES = {"min": 1.0, "max": -1.0}


def per_sample_regularizer(log_diag: tf.Tensor, form: str = "log1p") -> tf.Tensor:
    """Per-sample ``R(x)`` from the Jacobian log-diagonals.

    Args:
        log_diag: ``[B, K, d]`` values ``log|J^(k)_tt|`` (``[B, d]`` is read as ``K = 1``).
        form: ``"log1p"`` (Eq. 7/10) or ``"logdet"`` (Eq. 6).

    Returns:
        ``[B]`` tensor ``R(x_i)``.
    """
    if form not in FORMS:
        raise ValueError(f"Unknown regularizer form {form!r}; expected one of {FORMS}.")
    log_diag = tf.convert_to_tensor(log_diag)
    if log_diag.shape.rank == 2:
        log_diag = log_diag[:, None, :]
    if log_diag.shape.rank != 3:
        raise ValueError(f"log_diag must have shape [B, K, d] or [B, d], got {log_diag.shape}.")
    d = tf.cast(tf.shape(log_diag)[-1], log_diag.dtype)
    terms = tf.math.softplus(log_diag) if form == "log1p" else log_diag
    return tf.reduce_sum(terms, axis=[1, 2]) / d


def determinant_regularizer(
    log_diag: tf.Tensor,
    form: str = "log1p",
    mask: tf.Tensor | None = None,
) -> tf.Tensor:
    """``R(Z)``: the mean of :func:`per_sample_regularizer` over the samples of ``Z``.

    Args:
        log_diag: ``[N, K, d]`` Jacobian log-diagonals of the samples of ``Z``.
        form: ``"log1p"`` (Eq. 7/10) or ``"logdet"`` (Eq. 6).
        mask: optional ``[N]`` boolean; samples with ``False`` (e.g. augmented
            points of singleton classes, which have no partner) are left out.

    Returns:
        Scalar ``R(Z)``; 0 when no sample is selected.
    """
    per_sample = per_sample_regularizer(log_diag, form)
    if mask is None:
        return tf.reduce_mean(per_sample)
    weights = tf.cast(mask, per_sample.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(per_sample * weights), tf.reduce_sum(weights))


@keras.saving.register_keras_serializable(package="detreg_keras")
class DeterminantRegularizer(keras.layers.Layer):
    """Adds ``sign·λ·R(Z)`` to the model losses through ``add_loss``.

    ``role="min"`` adds ``+λ·R`` (the inference head, Eq. 11's ``λ1`` term),
    ``role="max"`` adds ``-λ·R`` (the dueling head, ``λ2``). Calling the layer
    returns the unsigned, unweighted ``R(Z)`` so it can be logged. Keras 3 clears
    ``layer.losses`` at every outermost call: read them right after the call.

    Args:
        weight: λ ≥ 0.
        role: ``"min"`` or ``"max"``.
        form: ``"log1p"`` (Eq. 7/10, default) or ``"logdet"`` (Eq. 6).
    """

    def __init__(self, weight: float = 0.05, role: str = "min", form: str = "log1p", **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}.")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}.")
        if weight < 0:
            raise ValueError(f"weight (λ) must be >= 0, got {weight}; use role='max' to maximise R.")
        self.weight = float(weight)
        self.role = role
        self.form = form

    @property
    def sign(self) -> float:
        return ROLES[self.role]

    def penalty(self, log_diag: tf.Tensor, mask: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """Return ``(sign·λ·R(Z), R(Z))`` without touching ``add_loss``."""
        value = determinant_regularizer(log_diag, self.form, mask)
        return self.sign * self.weight * value, value

    def call(self, log_diag, mask=None):
        penalty, value = self.penalty(log_diag, mask)
        self.add_loss(penalty)
        return value

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"weight": self.weight, "role": self.role, "form": self.form})
        return config
