"""Normalizing-flow metric heads built on ``tfp.bijectors``, with a per-coupling Jacobian diagonal.

Paper Sec. 4 ("Deep metric layer"): the metric layer is an invertible map
``g: R^D -> R^D`` made of coupling layers, whose Jacobian is triangular, so that

    det(Dg) = Π_t ∂y_t/∂x_t                                           (Eq. 9)

Every head's forward pass (training, ``call``/``predict`` and the exported
graph) is a ``tfp.bijectors`` chain, in forward order:

* **Real-NVP** (:class:`RealNVPFlow`): ``num_couplings`` ``tfb.RealNVP`` affine
  couplings (Dinh et al. 2016) with a ``tfb.Permute`` between consecutive ones::

      y_{1:m} = x_{1:m}
      y_{m+1:D} = x_{m+1:D} ⊙ exp(s(x_{1:m})) + t(x_{1:m})

  The shift-and-log-scale function of each ``tfb.RealNVP`` is the coupling's
  Keras network (:class:`CouplingNetwork`); the log-scale is bounded,
  ``s = b·tanh(ŝ / b)``, and optionally the shift too (``shift_bound``,
  ``t = b_t·tanh(t̂ / b_t)``; default unbounded). Jacobian diagonal
  ``(1,…,1, exp(s))``, whatever the shift.
* **NICE** (:class:`NICEFlow`): the same chain with shift-only couplings
  (``tfb.RealNVP`` whose function returns no log-scale: volume preserving,
  Dinh et al. 2014), followed by a learned diagonal scale ``tfb.Scale``
  (:class:`DiagonalScale`, ``y = x ⊙ exp(σ)``); without it the determinant of
  a NICE head would be constant and the regulariser could not act on it.

The regulariser (:mod:`detreg_keras.regularizers`) needs, per sample, the
log-diagonal ``log|J_tt|`` of each triangular block, shape ``[B, K, D]``. It is
taken from the *same* evaluation of the coupling networks that the bijector
uses: the shift-and-log-scale function handed to ``tfb.RealNVP`` records the
log-scale it returns (one network evaluation per coupling and forward pass).
A fresh chain is built at every call, so that no TFP bijector cache outlives a
``tf.function`` graph; the Keras networks are built in ``build()``, before any
bijector wraps them.

The weights and their names are those of the hand-written Keras flows of
layout version 1, so ``.keras`` files saved before the move to tfp
(:data:`LAYOUT_VERSION` 2) load unchanged; a file from a newer layout fails
with a message naming its version (:func:`check_layout_version`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

tfb = tfp.bijectors

_PACKAGE = "detreg_keras"

#: Version of the flow layout written into ``get_config`` (``layout_version``).
#: 1: hand-written Keras forward pass (detreg_keras 0.1.0 before issue 13);
#: 2: the forward pass runs through ``tfp.bijectors`` (same weights as 1).
LAYOUT_VERSION = 2
READABLE_LAYOUTS = (1, 2)


def check_layout_version(version: int | None, what: str) -> int:
    """Validate the ``layout_version`` of a saved config; ``None`` means 1 (written before versioning).

    Args:
        version: the saved value, or ``None`` when the key is absent.
        what: the object being loaded, for the message.

    Returns:
        The layout version as an int.

    Raises:
        ValueError: the layout is not one this version of detreg_keras reads.
    """
    version = 1 if version is None else int(version)
    if version not in READABLE_LAYOUTS:
        raise ValueError(
            f"{what} was saved with flow layout version {version} (written by a newer detreg_keras); "
            f"this detreg_keras reads flow layout versions {list(READABLE_LAYOUTS)}. Upgrade detreg_keras to load it."
        )
    return version


def bounded_log_scale(raw: tf.Tensor, bound: float) -> tf.Tensor:
    """Soft-clip a raw log-scale into ``(-bound, bound)``: ``bound·tanh(raw/bound)``.

    Args:
        raw: unconstrained log-scale.
        bound: the bound ``b > 0``; ``exp(s)`` stays within ``(e^-b, e^b)``.
    """
    return bound * tf.math.tanh(raw / bound)


def _check_bound(log_scale_bound: float) -> float:
    bound = float(log_scale_bound)
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"log_scale_bound must be a finite number > 0, got {log_scale_bound}.")
    return bound


def _check_shift_bound(shift_bound: float | None) -> float | None:
    if shift_bound is None:
        return None
    bound = float(shift_bound)
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"shift_bound must be a finite number > 0 or None, got {shift_bound}.")
    return bound


def _check_hidden_units(hidden_units: Sequence[int] | int) -> tuple[int, ...]:
    if isinstance(hidden_units, int):
        hidden_units = (hidden_units,)
    units = tuple(int(h) for h in hidden_units)
    if any(h < 1 for h in units):
        raise ValueError(f"hidden_units must all be >= 1, got {list(units)}.")
    return units


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CouplingNetwork(keras.layers.Layer):
    """MLP ``x_{1:m} -> (shift, raw_log_scale)``: the shift-and-log-scale network of a coupling.

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
        self.hidden_units = _check_hidden_units(hidden_units)
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


class _Record:
    """What one bijector evaluation saw: the coupling's log-scale (``None`` for NICE) and its input."""

    def __init__(self):
        self.log_scale: tf.Tensor | None = None
        self.conditioner: tf.Tensor | None = None
        self.calls = 0


class _BijectorLayer(keras.layers.Layer):
    """A layer whose transform is the fresh ``tfb`` bijector returned by ``make_bijector()``."""

    def make_bijector(self, record: _Record | None = None) -> tfb.Bijector:
        raise NotImplementedError

    def call(self, x):
        return self.make_bijector().forward(x)

    def inverse(self, y: tf.Tensor) -> tf.Tensor:
        """The inverse map (the bijector's closed-form ``inverse``)."""
        return self.make_bijector().inverse(y)

    def bijector(self) -> tfb.Bijector:
        """The layer's transform as a ``tfp.bijectors`` bijector over its weights."""
        return self.make_bijector()


class _Coupling(_BijectorLayer):
    """Shared machinery of the affine and additive coupling layers (a ``tfb.RealNVP`` over a Keras net).

    Args:
        hidden_units: hidden widths of the coupling network.
        activation: hidden activation.
        log_scale_bound: bound ``b`` of the log-scale, ``s = b·tanh(ŝ/b)``.
        shift_bound: bound ``b_t`` of the shift, ``t = b_t·tanh(t̂/b_t)``;
            ``None`` (default): unbounded shift.
    """

    with_scale: bool = True

    def __init__(
        self,
        hidden_units: Sequence[int] = (512,),
        activation: str = "relu",
        log_scale_bound: float = 2.0,
        shift_bound: float | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_units = _check_hidden_units(hidden_units)
        self.activation = activation
        self.log_scale_bound = _check_bound(log_scale_bound)
        self.shift_bound = _check_shift_bound(shift_bound)
        self.net = None

    def build(self, input_shape):
        dim = input_shape[-1]
        if dim is None or int(dim) < 2:
            raise ValueError(f"A coupling layer needs at least 2 input dimensions, got {dim}.")
        dim = int(dim)
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

    def _shift_and_log_scale(self, x0: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor | None]:
        shift, raw = self.net(x0)
        if self.shift_bound is not None:
            shift = bounded_log_scale(shift, self.shift_bound)  # the same soft clip, b·tanh(t/b)
        if raw is None:
            return shift, None
        return shift, bounded_log_scale(raw, self.log_scale_bound)

    def make_bijector(self, record: _Record | None = None) -> tfb.RealNVP:
        """A new ``tfb.RealNVP`` whose shift-and-log-scale function is this layer's Keras network.

        Args:
            record: if given, every evaluation of the network stores its
                log-scale there (for the Jacobian diagonal, without a second pass).
        """

        def shift_and_log_scale_fn(x0, output_units, **_):
            del output_units
            shift, log_scale = self._shift_and_log_scale(x0)
            if record is not None:
                record.log_scale, record.conditioner = log_scale, x0
                record.calls += 1
            return shift, log_scale

        return tfb.RealNVP(
            num_masked=self.num_masked,
            shift_and_log_scale_fn=shift_and_log_scale_fn,
            is_constant_jacobian=not self.with_scale,
            name=self.name,
        )

    def log_diag(self, record: _Record) -> tf.Tensor:
        """``log|J_tt|`` ``[B, D]`` of the evaluation in ``record``: 0 on the masked part, ``s`` on the rest."""
        if record.calls != 1:
            raise RuntimeError(f"{self.name}: expected one network evaluation per forward pass, got {record.calls}.")
        x0 = record.conditioner
        if record.log_scale is None:
            shape = tf.concat([tf.shape(x0)[:-1], [self.dim]], axis=0)
            return tf.zeros(shape, x0.dtype)
        return tf.concat([tf.zeros_like(x0), record.log_scale], axis=-1)

    def forward_with_log_diag(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Return ``(y, log|J_tt|)``; the log-diagonal is ``[B, D]`` (0 on the masked part)."""
        record = _Record()
        y = self.make_bijector(record).forward(x)
        return y, self.log_diag(record)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "hidden_units": list(self.hidden_units),
                "activation": self.activation,
                "log_scale_bound": self.log_scale_bound,
                "shift_bound": self.shift_bound,
            }
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AffineCoupling(_Coupling):
    """Real-NVP affine coupling ``y_b = x_b ⊙ exp(s(x_a)) + t(x_a)`` (Dinh et al. 2016) as ``tfb.RealNVP``.

    Jacobian diagonal: ``1`` on the ``m = D // 2`` conditioning coordinates and
    ``exp(s)`` on the others (Eq. 9), ``s`` bounded by ``log_scale_bound``.
    """

    with_scale = True


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AdditiveCoupling(_Coupling):
    """NICE additive coupling ``y_b = x_b + t(x_a)`` (Dinh et al. 2014), a shift-only ``tfb.RealNVP``.

    Jacobian diagonal ≡ 1.
    """

    with_scale = False


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DiagonalScale(_BijectorLayer):
    """Learned per-dimension scale ``y = x ⊙ exp(σ)`` (the scaling layer of NICE), as ``tfb.Scale``.

    ``σ`` is initialised to 0 and bounded like the coupling log-scales. Its
    Jacobian diagonal ``exp(σ)`` does not depend on the input.

    Args:
        log_scale_bound: bound ``b`` of ``σ = b·tanh(σ̂/b)``.
    """

    def __init__(self, log_scale_bound: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.log_scale_bound = _check_bound(log_scale_bound)

    def build(self, input_shape):
        self.dim = int(input_shape[-1])
        self.raw_log_scale = self.add_weight(
            name="raw_log_scale", shape=(self.dim,), initializer="zeros", trainable=True
        )
        self.built = True

    def log_scale(self) -> tf.Tensor:
        return bounded_log_scale(tf.convert_to_tensor(self.raw_log_scale), self.log_scale_bound)

    def make_bijector(self, record: _Record | None = None) -> tfb.Scale:
        """A new ``tfb.Scale(log_scale=σ)``; ``record`` (if given) receives ``σ``."""
        log_scale = self.log_scale()
        if record is not None:
            record.log_scale = log_scale
            record.calls += 1
        return tfb.Scale(log_scale=log_scale, name=self.name)

    def log_diag(self, record: _Record, like: tf.Tensor) -> tf.Tensor:
        """``σ`` broadcast to the shape of ``like`` (the same for every sample)."""
        return tf.broadcast_to(tf.cast(record.log_scale, like.dtype), tf.shape(like))

    def forward_with_log_diag(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        record = _Record()
        y = self.make_bijector(record).forward(x)
        return y, self.log_diag(record, y)

    def get_config(self) -> dict:
        config = super().get_config()
        config["log_scale_bound"] = self.log_scale_bound
        return config


class FlowHead(keras.layers.Layer):
    """A ``tfb.Chain`` of coupling bijectors with fixed random ``tfb.Permute`` in between.

    Subclasses choose the coupling type. The layer's ``call`` returns the flow
    output; :meth:`forward_with_log_diag` also returns the per-coupling Jacobian
    log-diagonal ``[B, K, D]`` used by :mod:`detreg_keras.regularizers`, from
    the same chain evaluation.

    Args:
        num_couplings: number of coupling layers ``K >= 1`` (paper: 12).
        hidden_units: hidden widths of each coupling network (paper: 512).
        activation: hidden activation of the coupling networks.
        log_scale_bound: bound of every log-scale, ``|s| < b`` (finite, > 0).
        shift_bound: if given, every coupling shift is soft-clipped to
            ``(-b, b)``, ``t = b·tanh(t̂/b)``; ``None`` (default): unbounded
            shifts (layout versions 1-2). The Jacobian diagonal does not depend on
            the shifts, so the regulariser is unchanged.
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
        shift_bound: float | None = None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if int(num_couplings) != num_couplings or int(num_couplings) < 1:
            raise ValueError(f"num_couplings (K) must be an integer >= 1, got {num_couplings}.")
        self.num_couplings = int(num_couplings)
        self.hidden_units = _check_hidden_units(hidden_units)
        self.activation = activation
        self.log_scale_bound = _check_bound(log_scale_bound)
        self.shift_bound = _check_shift_bound(shift_bound)
        self.permutation_seed = int(permutation_seed)
        self.couplings = [
            self.coupling_cls(
                hidden_units=self.hidden_units,
                activation=activation,
                log_scale_bound=self.log_scale_bound,
                shift_bound=self.shift_bound,
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

    def _chain(self, records: list[_Record] | None = None) -> tfb.Chain:
        """A new ``tfb.Chain`` of the head; ``records[k]`` receives block k's log-scale."""
        bijectors = []  # forward order; tfb.Chain applies its list right-to-left
        for k, (layer, perm) in enumerate(self._steps()):
            bijectors.append(layer.make_bijector(None if records is None else records[k]))
            if perm is not None:
                bijectors.append(tfb.Permute(permutation=tf.convert_to_tensor(perm), axis=-1))
        return tfb.Chain(list(reversed(bijectors)), name=self.name)

    def _prepare(self, x: tf.Tensor) -> tf.Tensor:
        x = tf.cast(x, self.compute_dtype)
        if not self.built:
            self.build(tuple(x.shape))
        if x.shape.rank is not None and x.shape[-1] is None:  # e.g. after an all_gather
            x = tf.ensure_shape(x, [None] * (x.shape.rank - 1) + [self.dim])
        return x

    def forward_with_log_diag(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Forward pass through the bijector chain, returning ``(y [B, D], log|J_tt| [B, K, D])``.

        ``log_diag[:, k]`` is the log-diagonal of the k-th triangular block in its
        own (permuted) coordinates, recorded while the chain ran (no second
        network evaluation); ``log|det J| = Σ_{k,t} log_diag[:, k, t]`` because
        permutations have ``|det| = 1``.
        """
        x = self._prepare(x)
        records = [_Record() for _ in self.diagonal_layers]
        y = self._chain(records).forward(x)
        return y, tf.stack(self._log_diags(records, y), axis=1)

    def _log_diags(self, records: list[_Record], y: tf.Tensor) -> list[tf.Tensor]:
        return [layer.log_diag(record) for layer, record in zip(self.couplings, records)]

    def call(self, x):
        return self._chain().forward(self._prepare(x))

    def log_det_jacobian(self, x: tf.Tensor) -> tf.Tensor:
        """Per-sample ``log|det ∂y/∂x|``, shape ``[B]`` (sum of the recorded log-diagonals)."""
        return tf.reduce_sum(self.forward_with_log_diag(x)[1], axis=[1, 2])

    def inverse(self, y: tf.Tensor) -> tf.Tensor:
        """Invert the whole flow (``tfb.Chain.inverse``, closed form, coupling by coupling)."""
        return self._chain().inverse(self._prepare(y))

    def bijector(self) -> tfb.Bijector:
        """The flow as a new ``tfp.bijectors`` chain sharing this layer's weights.

        The same chain type ``call`` runs; use it for ``inverse``,
        ``forward_log_det_jacobian(x, event_ndims=1)`` or a
        ``tfd.TransformedDistribution``. Build the layer first.
        """
        if not self.built:
            raise ValueError("Build the flow (call it once) before asking for its bijector.")
        return self._chain()

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
                "shift_bound": self.shift_bound,
                "layout_version": LAYOUT_VERSION,
            }
        )
        return config

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        check_layout_version(config.pop("layout_version", None), f"{cls.__name__} {config.get('name')!r}")
        return cls(**config)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RealNVPFlow(FlowHead):
    """Real-NVP metric head: ``num_couplings`` ``tfb.RealNVP`` affine couplings with permutations (Sec. 4)."""

    coupling_cls = AffineCoupling


@keras.saving.register_keras_serializable(package=_PACKAGE)
class NICEFlow(FlowHead):
    """NICE metric head: shift-only ``tfb.RealNVP`` couplings with permutations, then a ``tfb.Scale``.

    The additive couplings are volume preserving, so the determinant of the head
    is ``Π exp(σ_t)`` from :class:`DiagonalScale` (one more diagonal block,
    ``K = num_couplings + 1``), the same for every input.
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

    def _log_diags(self, records: list[_Record], y: tf.Tensor) -> list[tf.Tensor]:
        return super()._log_diags(records[:-1], y) + [self.scale.log_diag(records[-1], y)]


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
