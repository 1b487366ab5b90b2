"""Normalizing-flow metric heads with a tractable, per-coupling Jacobian diagonal.

Paper Sec. 4 ("Deep metric layer"): the metric layer is an invertible map
``g: R^D -> R^D`` made of coupling layers, whose Jacobian is triangular, so that

    det(Dg) = Π_t ∂y_t/∂x_t                                           (Eq. 9)

Two coupling types are provided, stacked ``num_couplings`` times (12 in the
paper) with a fixed, seeded random permutation between consecutive couplings:

* **Real-NVP** affine coupling (Dinh et al. 2016), :class:`AffineCoupling`::

      y_{1:m} = x_{1:m}
      y_{m+1:D} = x_{m+1:D} ⊙ exp(s(x_{1:m})) + t(x_{1:m})

  with Jacobian diagonal ``(1,…,1, exp(s))``, so ``log|det J| = Σ s``. The
  log-scale is bounded, ``s = b·tanh(ŝ / b)``, for stability.
* **NICE** additive coupling (Dinh et al. 2014), :class:`AdditiveCoupling`:
  ``s ≡ 0`` (volume preserving), followed by one learned diagonal scale
  :class:`DiagonalScale`, ``y = x ⊙ exp(σ)``; without it the determinant of a
  NICE head would be constant and the regulariser could not act on it.

Every flow layer returns, besides its output, the per-sample log-diagonal of
each coupling's Jacobian, ``log|J_tt|`` of shape ``[B, K, D]`` (``K`` diagonal
blocks), which is all the regularizer of Eq. 6/7/10 needs.

The forward pass evaluates each coupling network once. The same transform is
exposed as a ``tfp.bijectors`` chain (:meth:`FlowHead.bijector`: ``tfb.RealNVP``
couplings built on the *same* Keras networks, ``tfb.Permute`` between them,
``tfb.Scale`` for NICE) for the inverse, log-probabilities and cross-checks;
the tests assert both paths agree.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

tfb = tfp.bijectors

_PACKAGE = "detreg_keras"


def bounded_log_scale(raw: tf.Tensor, bound: float) -> tf.Tensor:
    """Soft-clip a raw log-scale into ``(-bound, bound)``: ``bound·tanh(raw/bound)``.

    Args:
        raw: unconstrained log-scale.
        bound: the bound ``b > 0``; ``exp(s)`` stays within ``(e^-b, e^b)``.
    """
    return bound * tf.math.tanh(raw / bound)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CouplingNetwork(keras.layers.Layer):
    """MLP ``x_{1:m} -> (shift, raw_log_scale)`` used inside a coupling layer.

    Hidden layers are Dense with ``activation``; the output layer is initialised
    to zeros so that every coupling starts as the identity map.

    Args:
        output_units: ``D - m``, the number of transformed coordinates.
        hidden_units: widths of the hidden Dense layers.
        activation: hidden activation.
        with_scale: also predict a log-scale (Real-NVP) or only a shift (NICE).
    """

    def __init__(
        self,
        output_units: int,
        hidden_units: Sequence[int] = (512,),
        activation: str = "relu",
        with_scale: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.output_units = int(output_units)
        self.hidden_units = tuple(int(h) for h in hidden_units)
        self.activation = activation
        self.with_scale = bool(with_scale)
        self.hidden = [
            keras.layers.Dense(h, activation=activation, name=f"hidden_{i}", dtype=self.dtype_policy)
            for i, h in enumerate(self.hidden_units)
        ]
        self.out = keras.layers.Dense(
            self.output_units * (2 if self.with_scale else 1),
            kernel_initializer="zeros",
            bias_initializer="zeros",
            name="out",
            dtype=self.dtype_policy,
        )

    def build(self, input_shape):
        # Built explicitly (not lazily at first call) so that the tfp bijector
        # wrapping this network never creates variables inside a FuncGraph.
        shape = tuple(input_shape)
        for layer in self.hidden:
            layer.build(shape)
            shape = shape[:-1] + (layer.units,)
        self.out.build(shape)
        self.built = True

    def call(self, x):
        h = x
        for layer in self.hidden:
            h = layer(h)
        h = self.out(h)
        if self.with_scale:
            shift, raw_log_scale = tf.split(h, 2, axis=-1)
            return shift, raw_log_scale
        return h, None

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "output_units": self.output_units,
                "hidden_units": list(self.hidden_units),
                "activation": self.activation,
                "with_scale": self.with_scale,
            }
        )
        return config


class _Coupling(keras.layers.Layer):
    """Shared machinery of the affine and additive coupling layers."""

    with_scale: bool = True

    def __init__(
        self,
        hidden_units: Sequence[int] = (512,),
        activation: str = "relu",
        log_scale_bound: float = 2.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if log_scale_bound <= 0:
            raise ValueError(f"log_scale_bound must be > 0, got {log_scale_bound}.")
        self.hidden_units = tuple(int(h) for h in hidden_units)
        self.activation = activation
        self.log_scale_bound = float(log_scale_bound)
        self.net = None

    def build(self, input_shape):
        dim = int(input_shape[-1])
        if dim < 2:
            raise ValueError(f"A coupling layer needs at least 2 input dimensions, got {dim}.")
        self.dim = dim
        self.num_masked = dim // 2
        self.net = CouplingNetwork(
            dim - self.num_masked,
            self.hidden_units,
            self.activation,
            with_scale=self.with_scale,
            name="net",
            dtype=self.dtype_policy,
        )
        self.net.build((None, self.num_masked))
        self.built = True

    def _shift_and_log_scale(self, x0):
        shift, raw = self.net(x0)
        if raw is None:
            return shift, None
        return shift, bounded_log_scale(raw, self.log_scale_bound)

    def forward_with_log_diag(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Return ``(y, log|J_tt|)``; the log-diagonal is ``[B, D]`` (0 on the masked part)."""
        x0, x1 = x[..., : self.num_masked], x[..., self.num_masked :]
        shift, log_scale = self._shift_and_log_scale(x0)
        if log_scale is None:
            y1 = x1 + shift
            log_diag = tf.zeros_like(x)
        else:
            y1 = x1 * tf.exp(log_scale) + shift
            log_diag = tf.concat([tf.zeros_like(x0), log_scale], axis=-1)
        return tf.concat([x0, y1], axis=-1), log_diag

    def call(self, x):
        return self.forward_with_log_diag(x)[0]

    def inverse(self, y: tf.Tensor) -> tf.Tensor:
        """Invert the coupling (closed form)."""
        y0, y1 = y[..., : self.num_masked], y[..., self.num_masked :]
        shift, log_scale = self._shift_and_log_scale(y0)
        x1 = y1 - shift
        if log_scale is not None:
            x1 = x1 * tf.exp(-log_scale)
        return tf.concat([y0, x1], axis=-1)

    def bijector(self) -> tfb.Bijector:
        """The same coupling as a ``tfb.RealNVP`` over this layer's Keras network."""

        def shift_and_log_scale_fn(x0, output_units, **_):
            del output_units
            return self._shift_and_log_scale(x0)

        return tfb.RealNVP(
            num_masked=self.num_masked,
            shift_and_log_scale_fn=shift_and_log_scale_fn,
            is_constant_jacobian=not self.with_scale,
            name=self.name,
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "hidden_units": list(self.hidden_units),
                "activation": self.activation,
                "log_scale_bound": self.log_scale_bound,
            }
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AffineCoupling(_Coupling):
    """Real-NVP affine coupling ``y_b = x_b ⊙ exp(s(x_a)) + t(x_a)`` (Dinh et al. 2016).

    Jacobian diagonal: ``1`` on the ``m = D // 2`` conditioning coordinates and
    ``exp(s)`` on the others (Eq. 9), ``s`` bounded by ``log_scale_bound``.
    """

    with_scale = True


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AdditiveCoupling(_Coupling):
    """NICE additive coupling ``y_b = x_b + t(x_a)`` (Dinh et al. 2014); Jacobian diagonal ≡ 1."""

    with_scale = False


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DiagonalScale(keras.layers.Layer):
    """Learned per-dimension scale ``y = x ⊙ exp(σ)`` (the scaling layer of NICE).

    ``σ`` is initialised to 0 and bounded like the coupling log-scales.

    Args:
        log_scale_bound: bound ``b`` of ``σ = b·tanh(σ̂/b)``.
    """

    def __init__(self, log_scale_bound: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.log_scale_bound = float(log_scale_bound)

    def build(self, input_shape):
        self.raw_log_scale = self.add_weight(
            name="raw_log_scale", shape=(int(input_shape[-1]),), initializer="zeros", trainable=True
        )
        self.built = True

    def log_scale(self) -> tf.Tensor:
        return bounded_log_scale(tf.convert_to_tensor(self.raw_log_scale), self.log_scale_bound)

    def forward_with_log_diag(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        log_scale = tf.cast(self.log_scale(), x.dtype)
        return x * tf.exp(log_scale), tf.broadcast_to(log_scale, tf.shape(x))

    def call(self, x):
        return self.forward_with_log_diag(x)[0]

    def inverse(self, y: tf.Tensor) -> tf.Tensor:
        return y * tf.exp(-tf.cast(self.log_scale(), y.dtype))

    def bijector(self) -> tfb.Bijector:
        return tfb.Scale(log_scale=self.log_scale(), name=self.name)

    def get_config(self) -> dict:
        config = super().get_config()
        config["log_scale_bound"] = self.log_scale_bound
        return config


class FlowHead(keras.layers.Layer):
    """A stack of coupling layers with fixed random permutations in between.

    Subclasses choose the coupling type. The layer's ``call`` returns the flow
    output; :meth:`forward_with_log_diag` also returns the per-coupling Jacobian
    log-diagonal ``[B, K, D]`` used by :mod:`detreg_keras.regularizers`.

    Args:
        num_couplings: number of coupling layers (paper: 12).
        hidden_units: hidden widths of each coupling network (paper: 512).
        activation: hidden activation of the coupling networks.
        log_scale_bound: bound of every log-scale, ``|s| < b``.
        permutation_seed: seed of the ``num_couplings - 1`` fixed permutations.
            They are stored as non-trainable weights, so a saved model keeps them
            whatever the NumPy version that reloads it.
        **kwargs: passed to ``keras.layers.Layer``. The layer computes in float32
            by default (also under a mixed-precision policy) for stable log-dets.
    """

    coupling_cls: type[_Coupling] = AffineCoupling

    def __init__(
        self,
        num_couplings: int = 12,
        hidden_units: Sequence[int] | int = (512,),
        activation: str = "relu",
        log_scale_bound: float = 2.0,
        permutation_seed: int = 0,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if int(num_couplings) < 1:
            raise ValueError(f"num_couplings must be >= 1, got {num_couplings}.")
        if isinstance(hidden_units, int):
            hidden_units = (hidden_units,)
        self.num_couplings = int(num_couplings)
        self.hidden_units = tuple(int(h) for h in hidden_units)
        self.activation = activation
        self.log_scale_bound = float(log_scale_bound)
        self.permutation_seed = int(permutation_seed)
        self.couplings = [
            self.coupling_cls(
                hidden_units=self.hidden_units,
                activation=activation,
                log_scale_bound=self.log_scale_bound,
                name=f"coupling_{k}",
                dtype=self.dtype_policy,
            )
            for k in range(self.num_couplings)
        ]

    @property
    def diagonal_layers(self) -> list[keras.layers.Layer]:
        """The layers whose Jacobian diagonals enter the regulariser, in order."""
        return list(self.couplings)

    def build(self, input_shape):
        dim = input_shape[-1]
        if dim is None or int(dim) < 2:
            raise ValueError(f"{type(self).__name__} needs a known feature dimension >= 2, got {dim}.")
        dim = int(dim)
        self.dim = dim
        for coupling in self.couplings:
            coupling.build((None, dim))
        rng = np.random.default_rng(self.permutation_seed)
        self.permutations = [
            self.add_weight(
                name=f"permutation_{k}",
                shape=(dim,),
                dtype="int32",
                initializer=keras.initializers.Constant(rng.permutation(dim).astype("int32")),
                trainable=False,
            )
            for k in range(self.num_couplings - 1)
        ]
        self.built = True

    def _steps(self):
        """Yield ``(layer, permutation_or_None)`` in forward order."""
        for k, coupling in enumerate(self.couplings):
            perm = self.permutations[k] if k < self.num_couplings - 1 else None
            yield coupling, perm

    def forward_with_log_diag(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Forward pass returning ``(y [B, D], log|J_tt| [B, K, D])``.

        ``log_diag[:, k]`` is the log-diagonal of the k-th triangular block in its
        own (permuted) coordinates; ``log|det J| = Σ_{k,t} log_diag[:, k, t]``
        because permutations have ``|det| = 1``.
        """
        x = tf.cast(x, self.compute_dtype)
        if not self.built:
            self.build(tuple(x.shape))
        log_diags = []
        h = x
        for layer, perm in self._steps():
            h, log_diag = layer.forward_with_log_diag(h)
            log_diags.append(log_diag)
            if perm is not None:
                h = tf.gather(h, perm, axis=-1)
        return h, tf.stack(log_diags, axis=1)

    def call(self, x):
        return self.forward_with_log_diag(x)[0]

    def log_det_jacobian(self, x: tf.Tensor) -> tf.Tensor:
        """Per-sample ``log|det ∂y/∂x|``, shape ``[B]``."""
        return tf.reduce_sum(self.forward_with_log_diag(x)[1], axis=[1, 2])

    def inverse(self, y: tf.Tensor) -> tf.Tensor:
        """Invert the whole flow (closed form, coupling by coupling)."""
        h = tf.cast(y, self.compute_dtype)
        for layer, perm in reversed(list(self._steps())):
            if perm is not None:
                h = tf.gather(h, tf.math.invert_permutation(perm), axis=-1)
            h = layer.inverse(h)
        return h

    def bijector(self) -> tfb.Bijector:
        """The flow as a ``tfp.bijectors`` chain sharing this layer's weights.

        Use it for ``inverse``, ``forward_log_det_jacobian(x, event_ndims=1)`` or
        a ``tfd.TransformedDistribution``. Build the layer first.
        """
        if not self.built:
            raise ValueError("Build the flow (call it once) before asking for its bijector.")
        bijectors = []  # forward order; tfb.Chain applies the list right-to-left
        for layer, perm in self._steps():
            bijectors.append(layer.bijector())
            if perm is not None:
                bijectors.append(tfb.Permute(permutation=tf.convert_to_tensor(perm), axis=-1))
        return tfb.Chain(list(reversed(bijectors)), name=self.name)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "num_couplings": self.num_couplings,
                "hidden_units": list(self.hidden_units),
                "activation": self.activation,
                "log_scale_bound": self.log_scale_bound,
                "permutation_seed": self.permutation_seed,
            }
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RealNVPFlow(FlowHead):
    """Real-NVP metric head: ``num_couplings`` affine couplings with permutations (paper Sec. 4)."""

    coupling_cls = AffineCoupling


@keras.saving.register_keras_serializable(package=_PACKAGE)
class NICEFlow(FlowHead):
    """NICE metric head: additive couplings with permutations, then a learned diagonal scale.

    The additive couplings are volume preserving, so the determinant of the head
    is ``Π exp(σ_t)`` from :class:`DiagonalScale` (one more diagonal block,
    ``K = num_couplings + 1``).
    """

    coupling_cls = AdditiveCoupling

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = DiagonalScale(self.log_scale_bound, name="scale", dtype=self.dtype_policy)

    @property
    def diagonal_layers(self) -> list[keras.layers.Layer]:
        return list(self.couplings) + [self.scale]

    def build(self, input_shape):
        super().build(input_shape)
        self.scale.build((None, self.dim))

    def _steps(self):
        yield from super()._steps()
        yield self.scale, None


FLOWS: dict[str, type[FlowHead]] = {"realnvp": RealNVPFlow, "nice": NICEFlow}


def build_flow(kind: str, **kwargs) -> FlowHead:
    """Build a flow head by name: ``"realnvp"`` or ``"nice"``.

    Raises:
        ValueError: for an unknown kind.
    """
    key = kind.lower().replace("-", "").replace("_", "")
    if key not in FLOWS:
        raise ValueError(f"Unknown flow type {kind!r}; expected one of {sorted(FLOWS)} (or 'none' in DRegModel).")
    return FLOWS[key](**kwargs)
