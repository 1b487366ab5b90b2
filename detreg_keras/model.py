"""``DRegModel``: backbone → embedding → dueling flow heads, trained with Eq. 11.

Architecture (paper Fig. 2 and Sec. 5.2)::

    images (raw pixels) ─ backbone ─ GAP+GMP ─ Dense(512) = z ─┬─ flow_min ─ L2 ─ e1  (inference)
                                                               └─ flow_max ─ L2 ─ e2  (training only)

Training objective (Eq. 11), each head with its own proxies::

    L = DML(e1) + DML(e2) + λ1·R(Z1) − λ2·R(Z2)

where ``Z`` holds the batch features ``z`` and the augmented points
``z_ij = z_i + ε (z_j − z_i)`` (:mod:`detreg_keras.augment`), which enter the
regulariser ``R`` (:mod:`detreg_keras.regularizers`) but not the DML loss.

``call()`` returns the L2-normalised output of the minimising head, the
embedding used for retrieval. In the training forward pass
(:meth:`DRegModel.compute_dreg_losses`) the regulariser layers add
``+λ1·R(Z1)`` and ``−λ2·R(Z2)`` with ``add_loss``; ``train_step`` takes them,
with any ``add_loss`` term of the user's own layers, from the layers'
``losses`` and adds each once. Switches: ``dueling=False`` keeps one head and
the ``+λ1·R(Z1)`` term; ``lambda_min = lambda_max = 0`` trains the same
architecture without regularisation; ``flow="none"`` is the plain Proxy Anchor
baseline on the same backbone and embedding.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from detreg_keras import losses as dml_losses
from detreg_keras.augment import between_sample_augment
from detreg_keras.backbones import build_backbone
from detreg_keras.flows import LAYOUT_VERSION, build_flow, check_layout_version
from detreg_keras.optim import make_optimizer
from detreg_keras.regularizers import REDUCTIONS, DeterminantRegularizer, check_weight

_PACKAGE = "detreg_keras"


def l2_normalize(x: tf.Tensor) -> tf.Tensor:
    """Row-wise L2 normalisation of a tensor in the model's graph (stable at 0), keeping its dtype.

    The embedding graph (training and the exported ONNX/SavedModel) needs a
    tensor op; it keeps ``x``'s dtype so the head output follows the layer
    policy. The losses use :func:`detreg_keras.losses._pairs.l2_normalize`
    (cast to float32 first); numpy arrays: :func:`detreg_runtime.arrays.l2_normalize`.
    """
    return tf.math.l2_normalize(x, axis=-1, epsilon=1e-12)


#: Choices of ``DRegModel(head_input_norm=...)``: what the flow heads see of ``z``.
HEAD_INPUT_NORMS = ("none", "l2")


def normalize_head_input(z: tf.Tensor, kind: str = "none") -> tf.Tensor:
    """The flow heads' input: ``z`` itself (``"none"``) or ``√d · z / ‖z‖`` (``"l2"``).

    ``"l2"`` is a fixed (parameter-free) normalisation between the embedding and
    the heads, one reading of the paper's "activation layer for the connection
    to the deep metric layers" (Sec. 5.2): every head input lies on the sphere
    of radius ``√d`` (unit root-mean-square coordinate), whatever the scale of
    ``z``. The plain baseline (``flow="none"``) is unaffected, since it
    L2-normalises ``z`` anyway.

    Args:
        z: ``[B, d]`` features.
        kind: one of :data:`HEAD_INPUT_NORMS`.
    """
    if kind == "none":
        return z
    if kind == "l2":
        d = tf.cast(tf.shape(z)[-1], z.dtype)
        return tf.sqrt(d) * l2_normalize(z)
    raise ValueError(f"head_input_norm must be one of {HEAD_INPUT_NORMS}, got {kind!r}.")


def _num_replicas() -> int:
    context = tf.distribute.get_replica_context()
    return 1 if context is None else int(context.num_replicas_in_sync)


def _gather_global_batch(features: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Under ``tf.distribute``, all-gather the replicas' features and labels.

    Proxy Anchor and R(Z) are batch-level (non-decomposable) terms: computing them
    on each replica's slice would change the objective. Every replica therefore
    computes the loss of the global batch; the gradient of ``all_gather`` sums
    the upstream gradients of all replicas, so after the optimizer's cross-replica
    sum, dividing the loss by the replica count gives the single-device gradient.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return features, labels
    gathered, gathered_labels = context.all_gather(features, axis=0), context.all_gather(labels, axis=0)
    # all_gather loses the static feature dimension, which the tfp couplings need to split x
    gathered = tf.ensure_shape(gathered, [None] + features.shape[1:])
    return gathered, tf.ensure_shape(gathered_labels, [None])


_NONFINITE_HINT = (
    "training stopped before the optimizer step, so the trainable weights and saved checkpoints are unchanged. "
    "Lower the learning rate or the lambdas, check the inputs for NaN/Inf, or use a smaller log_scale_bound."
)


def _assert_finite(value: tf.Tensor, what: str) -> list:
    """Assert that ``value`` is finite; returns the op (in graphs) for ``tf.control_dependencies``."""
    op = tf.debugging.Assert(
        tf.reduce_all(tf.math.is_finite(value)),
        [f"DRegModel: {what} became non-finite (NaN/Inf); {_NONFINITE_HINT}"],
    )
    return [] if op is None else [op]  # eager mode raises at once and returns None


_TERM_NAMES = {
    "loss": "loss (the total)",
    "dml": "dml (base loss of the heads)",
    "reg_min": "reg_min R(Z1)",
    "reg_max": "reg_max R(Z2)",
    "log_scale_min": "log_scale_min (log|J_tt| of head 1, dreg_flow_min)",
    "log_scale_max": "log_scale_max (log|J_tt| of head 2, dreg_flow_max)",
}


def _check_finite_terms(terms: dict[str, tf.Tensor]) -> list:
    """One check whose message names every term (of Eq. 11, or an ``add_loss`` term) that is not finite."""
    if not terms:
        return []
    names = tf.constant([_TERM_NAMES.get(name, name) for name in terms])
    finite = tf.stack([tf.reduce_all(tf.math.is_finite(tf.cast(v, tf.float32))) for v in terms.values()])
    bad = tf.strings.reduce_join(tf.boolean_mask(names, tf.logical_not(finite)), separator=", ")
    op = tf.debugging.Assert(
        tf.reduce_all(finite),
        ["DRegModel: these terms became non-finite (NaN/Inf):", bad, f"; {_NONFINITE_HINT}"],
    )
    return [] if op is None else [op]


def _call_and_collect(layer: keras.layers.Layer, collected: list | None, *args, **kwargs):
    """Call ``layer``; if ``collected`` is a list, append ``(layer.name, loss)`` for each of
    ``layer.losses``, read right after the call (Keras 3 clears them at the next outermost call)."""
    out = layer(*args, **kwargs)
    _collect(layer, collected)
    return out


def _collect(layer: keras.layers.Layer, collected: list | None) -> None:
    if collected is not None:
        collected.extend((layer.name, loss) for loss in layer.losses)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class EmbeddingHead(keras.layers.Layer):
    """Global average + global max pooling (summed) and a Dense projection to ``embedding_dim``.

    This is the embedding layer of the official Proxy Anchor code: the Dense
    kernel is initialised with ``kaiming_normal(mode='fan_out')``. A rank-2
    input (a backbone that already pools, or item features) skips the pooling.

    Args:
        embedding_dim: output dimension (paper: 512).
        activation: optional activation after the projection (the paper adds
            "an activation layer for the connection to the deep metric layers"
            without naming it; default ``None``).
    """

    def __init__(self, embedding_dim: int = 512, activation: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if int(embedding_dim) < 2:
            raise ValueError(f"embedding_dim must be >= 2 (flows split it in halves), got {embedding_dim}.")
        self.embedding_dim = int(embedding_dim)
        self.activation = activation
        self.dense = keras.layers.Dense(
            self.embedding_dim,
            activation=activation,
            kernel_initializer=keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal"),
            name="dense",
            dtype=self.dtype_policy,
        )

    def build(self, input_shape):
        if len(input_shape) not in (2, 4):
            raise ValueError(f"EmbeddingHead expects [B, h, w, C] or [B, C] features, got shape {input_shape}.")
        self.dense.build((None, input_shape[-1]))
        self.built = True

    def call(self, features):
        if len(features.shape) == 4:
            features = tf.reduce_mean(features, axis=[1, 2]) + tf.reduce_max(features, axis=[1, 2])
        return self.dense(features)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.embedding_dim)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"embedding_dim": self.embedding_dim, "activation": self.activation})
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DRegModel(keras.Model):
    """Deep metric model with dueling normalizing-flow heads and determinant regularisation.

    Args:
        num_classes: number of training classes; labels must lie in ``[0, num_classes)``.
        backbone: a ``keras.Model`` mapping raw pixels to a feature map (or
            vector), or a name for :func:`detreg_keras.backbones.build_backbone`.
        image_size: input side when ``backbone`` is a name.
        channels: input channels when ``backbone`` is a name.
        backbone_weights: ``weights`` for a named Keras Applications backbone.
        embedding_dim: dimension of ``z`` and of the flows (paper: 512).
        embedding_activation: optional activation after the embedding Dense.
        flow: ``"realnvp"`` (paper), ``"nice"`` or ``"none"`` (plain baseline).
        num_couplings: couplings per head (paper: 12).
        hidden_units: hidden widths of the coupling networks (paper: 512).
        log_scale_bound: bound on every coupling log-scale, ``s = b·tanh(ŝ/b)``
            (default 0.1; before issue 13: 2.0).
        shift_bound: bound on every coupling shift, ``t = b·tanh(t̂/b)``
            (default 0.1; ``None``: unbounded, the behaviour before issue 13).
        head_input_norm: ``"l2"`` (default: the heads see ``√d · z/‖z‖``,
            :func:`normalize_head_input`) or ``"none"`` (they see ``z``, the
            behaviour before issue 13). These three defaults (with a one-epoch
            linear warm-up of the heads' learning rate in
            :func:`detreg_keras.optim.make_optimizer`) are what lets the heads
            train at the paper's 1e-3: with ``2.0 / None / "none"`` the head
            outputs grew to ~1e7-1e8 within one epoch and the log-scales sat at
            their bound (RESULTS.md, "Flow heads at the paper's learning rate").
        permutation_seed: seed of the flows' fixed permutations (head 2 uses seed+1).
        dueling: keep the maximising head (paper) or drop it (single head).
        lambda_min: λ1 of Eq. 11 (paper: 0.05).
        lambda_max: λ2 of Eq. 11 (paper: 0.05).
        epsilon: ε of the between-sample augmentation (paper: 0.4); 0 disables it.
        regularizer_form: ``"log1p"`` (Eq. 7/10) or ``"logdet"`` (Eq. 6 / 2d).
        coupling_reduction: ``"sum"`` (default: R sums the Eq. 10 terms of the
            K couplings, identity head ``K·log 2``) or ``"mean"`` (their mean,
            identity ``log 2``: λ does not depend on K). See
            :mod:`detreg_keras.regularizers`.
        loss: base DML loss name from :data:`detreg_keras.losses.LOSSES`.
        loss_config: keyword arguments of the base loss (e.g. ``margin``, ``alpha``). With
            ``loss="xbm"`` (:class:`~detreg_keras.losses.CrossBatchMemory`): the wrapped pair
            loss and the memory, e.g. ``{"loss": "contrastive", "memory_size": 1024}``.
        **kwargs: ``keras.Model`` arguments (``name``...).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: keras.Model | str = "small_cnn",
        image_size: int = 224,
        channels: int = 3,
        backbone_weights: str | None = "imagenet",
        embedding_dim: int = 512,
        embedding_activation: str | None = None,
        flow: str = "realnvp",
        num_couplings: int = 12,
        hidden_units: Sequence[int] | int = (512,),
        log_scale_bound: float = 0.1,
        permutation_seed: int = 0,
        dueling: bool = True,
        lambda_min: float = 0.05,
        lambda_max: float = 0.05,
        epsilon: float = 0.4,
        regularizer_form: str = "log1p",
        coupling_reduction: str = "sum",
        loss: str = "proxy_anchor",
        loss_config: dict[str, Any] | None = None,
        shift_bound: float | None = 0.1,
        head_input_norm: str = "l2",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_classes is None or int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2 for metric learning, got {num_classes!r}.")
        if not 0.0 <= float(epsilon) <= 1.0:
            raise ValueError(f"epsilon must lie in [0, 1], got {epsilon}.")
        check_weight(lambda_min, "lambda_min (λ1)")
        check_weight(lambda_max, "lambda_max (λ2)")
        if coupling_reduction not in REDUCTIONS:
            raise ValueError(f"coupling_reduction must be one of {REDUCTIONS}, got {coupling_reduction!r}.")
        if head_input_norm not in HEAD_INPUT_NORMS:
            raise ValueError(f"head_input_norm must be one of {HEAD_INPUT_NORMS}, got {head_input_norm!r}.")
        if isinstance(hidden_units, int):
            hidden_units = (hidden_units,)
        self.num_classes = int(num_classes)
        if isinstance(backbone, str):
            backbone = build_backbone(backbone, image_size=image_size, weights=backbone_weights, channels=channels)
        if not isinstance(backbone, keras.Model):
            raise TypeError(f"backbone must be a keras.Model or a backbone name, got {type(backbone).__name__}.")
        self.backbone = backbone
        self.embedding_dim = int(embedding_dim)
        self.embedding_activation = embedding_activation
        self.flow_type = flow.lower()
        self.num_couplings = int(num_couplings)
        self.hidden_units = tuple(int(h) for h in hidden_units)
        self.log_scale_bound = float(log_scale_bound)
        self.shift_bound = None if shift_bound is None else float(shift_bound)
        self.head_input_norm = head_input_norm
        self.permutation_seed = int(permutation_seed)
        self.dueling = bool(dueling) and self.flow_type != "none"
        self.lambda_min = float(lambda_min)
        self.lambda_max = float(lambda_max)
        self.epsilon = float(epsilon)
        self.regularizer_form = regularizer_form
        self.coupling_reduction = coupling_reduction
        self.loss_name = loss
        self.loss_config = dict(loss_config or {})

        self.embedding = EmbeddingHead(self.embedding_dim, embedding_activation, name="dreg_embedding")
        flow_kwargs = dict(
            num_couplings=self.num_couplings,
            hidden_units=self.hidden_units,
            log_scale_bound=self.log_scale_bound,
            shift_bound=self.shift_bound,
        )
        self.flow_min = None
        self.flow_max = None
        if self.flow_type != "none":
            self.flow_min = build_flow(
                self.flow_type, permutation_seed=self.permutation_seed, name="dreg_flow_min", **flow_kwargs
            )
            self.reg_min = DeterminantRegularizer(
                self.lambda_min, "min", regularizer_form, coupling_reduction, name="dreg_reg_min"
            )
        if self.dueling:
            self.flow_max = build_flow(
                self.flow_type, permutation_seed=self.permutation_seed + 1, name="dreg_flow_max", **flow_kwargs
            )
            self.reg_max = DeterminantRegularizer(
                self.lambda_max, "max", regularizer_form, coupling_reduction, name="dreg_reg_max"
            )
        self.loss_min = self._build_loss("dreg_loss_min")
        self.loss_max = self._build_loss("dreg_loss_max") if self.dueling else None

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.dml_tracker = keras.metrics.Mean(name=self.loss_min.metric_name)
        self.reg_min_tracker = keras.metrics.Mean(name="reg_min") if self.flow_min is not None else None
        self.reg_max_tracker = keras.metrics.Mean(name="reg_max") if self.dueling else None

    def _build_loss(self, name: str) -> dml_losses.DMLLoss:
        """One head's base loss (its own proxies, or its own cross-batch memory)."""
        layer = dml_losses.get(
            self.loss_name, num_classes=self.num_classes, embedding_dim=self.embedding_dim, name=name, **self.loss_config
        )
        if isinstance(layer, dml_losses.CrossBatchMemory):
            layer.all_gather = False  # it gets the global batch from _gather_global_batch already
        return layer

    # ------------------------------------------------------------------ build
    def build(self, input_shape):
        input_shape = tuple(input_shape)
        self._check_image_shape(input_shape)
        if not self.backbone.built:
            self.backbone.build(input_shape)
        feature_shape = self.backbone.compute_output_shape(input_shape)
        self.embedding.build(feature_shape)
        z_shape = (None, self.embedding_dim)
        for flow in (self.flow_min, self.flow_max):
            if flow is not None:
                flow.build(z_shape)
        for loss in (self.loss_min, self.loss_max):
            if loss is not None:
                loss.build(z_shape)
        self.built = True

    # -------------------------------------------------------------- checks
    def _check_image_shape(self, shape) -> None:
        expected = tuple(self.backbone.input_shape)
        if len(shape) != len(expected):
            raise ValueError(
                f"DRegModel expects images of rank {len(expected)} {expected} (batch, height, width, channels), "
                f"got shape {tuple(shape)}."
            )
        for axis, name in ((-1, "channels"), (-2, "width"), (-3, "height")):
            want, got = expected[axis], shape[axis]
            if want is not None and got is not None and int(want) != int(got):
                raise ValueError(
                    f"DRegModel's backbone expects {name}={want} (input shape {expected}), got {name}={got} "
                    f"in input shape {tuple(shape)}. Resize/convert images in the data pipeline."
                )

    def _check_labels(self, labels: tf.Tensor) -> tf.Tensor:
        labels = tf.convert_to_tensor(labels)
        if labels.dtype.is_floating:
            labels = tf.cast(labels, tf.int32)
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        checks = [
            tf.debugging.assert_non_negative(labels, message="DRegModel: labels must be >= 0"),
            tf.debugging.assert_less(
                labels,
                tf.constant(self.num_classes, tf.int32),
                message=f"DRegModel: labels must be < num_classes={self.num_classes}",
            ),
        ]
        with tf.control_dependencies(checks):
            return tf.identity(labels)

    # ------------------------------------------------------------ forward
    def _assert_image_shape(self, images: tf.Tensor) -> tf.Tensor:
        """Static check plus an in-graph check for dimensions unknown while tracing."""
        self._check_image_shape(tuple(images.shape))
        expected = self.backbone.input_shape
        checks = [
            tf.debugging.assert_equal(
                tf.shape(images)[axis],
                int(expected[axis]),
                message=f"DRegModel: images must have {name}={expected[axis]} (backbone input {tuple(expected)})",
            )
            for axis, name in ((-1, "channels"), (-2, "width"), (-3, "height"))
            if expected[axis] is not None and images.shape[axis] is None
        ]
        if not checks:
            return images
        with tf.control_dependencies(checks):
            return tf.identity(images)

    def embed_features(
        self, images: tf.Tensor, training: bool = False, collected: list | None = None
    ) -> tf.Tensor:
        """Backbone + embedding: the features ``z`` fed to the flow heads (float32).

        Args:
            images: raw pixels ``[B, H, W, C]``.
            training: Keras' training flag.
            collected: if given, receives the ``losses`` (``add_loss`` and weight
                regularisers) of the backbone and the embedding layer, read right
                after their calls (see :meth:`compute_dreg_losses`).
        """
        images = self._assert_image_shape(images)
        features = _call_and_collect(self.backbone, collected, images, training=training)
        return tf.cast(_call_and_collect(self.embedding, collected, features, training=training), tf.float32)

    def call(self, images, training=False):
        return self.head_embedding(self.embed_features(images, training=training), training=training)

    def head_embedding(self, z: tf.Tensor, training=False) -> tf.Tensor:
        """The retrieval embedding of features ``z``: ``L2(flow_min(normalize_head_input(z)))``
        (``L2(z)`` without flows)."""
        if self.flow_min is not None:
            z = self.flow_min(normalize_head_input(z, self.head_input_norm), training=training)
        return l2_normalize(z)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.embedding_dim)

    def _head_terms(self, flow, regularizer, loss_layer, features, labels, mask, batch, collected, training):
        """One head: ``(DML(e), R(Z), log|J_tt|)``; the regulariser adds ``±λ·R(Z)`` with ``add_loss``."""
        out, log_diag = flow.forward_with_log_diag(features)
        _collect(flow, collected)  # its coupling networks were each called (and cleared) just now
        dml = _call_and_collect(loss_layer, collected, l2_normalize(out[:batch]), labels, training=training)
        value = _call_and_collect(regularizer, collected, log_diag, sample_mask=mask)
        return dml, value, log_diag

    def _regularized_points(self, z, labels):
        """``Z``: the features and, with ε > 0, their augmented points (Sec. 4), with the sample mask."""
        regularize = self.lambda_min > 0 or (self.dueling and self.lambda_max > 0)
        if not (regularize and self.epsilon > 0):
            return z, None
        augmented, valid = between_sample_augment(z, labels, self.epsilon)
        return tf.concat([z, augmented], axis=0), tf.concat([tf.ones_like(valid), valid], axis=0)

    def compute_dreg_losses(self, images, labels, training: bool = False) -> dict[str, tf.Tensor]:
        """All terms of Eq. 11 for a batch, the regulariser terms taken from ``add_loss``.

        ``loss = dml + Σ losses``: the regulariser layers add ``+λ1·R(Z1)`` and
        ``−λ2·R(Z2)`` with ``add_loss``; they and every other ``add_loss`` or
        weight-regulariser term of the model's layers (what ``self.losses``
        aggregates) are read from each layer right after its call, as Keras 3
        clears them at the next outermost call, and added once. Reading them
        layer by layer, not ``self.losses`` once at the end, keeps this exact
        under ``MirroredStrategy``: its replica threads share the layers' loss
        lists and switch at the features' ``all_gather``. The ``add_loss``
        terms themselves come with :meth:`compute_dreg_losses_and_added`.

        Returns:
            dict with ``loss`` (total), ``dml`` (sum of the heads' base losses),
            ``reg_min`` and ``reg_max`` (unsigned ``R(Z1)``, ``R(Z2)``), and
            ``log_scale_min`` / ``log_scale_max`` (largest ``|log|J_tt||`` of
            each head, checked by the non-finite guard).
        """
        return self.compute_dreg_losses_and_added(images, labels, training)[0]

    def compute_dreg_losses_and_added(
        self, images, labels, training: bool = False
    ) -> tuple[dict[str, tf.Tensor], list[tuple[str, tf.Tensor]]]:
        """:meth:`compute_dreg_losses` and the ``(layer name, term)`` pairs of the ``add_loss`` terms it added."""
        if not self.built:  # fit() defers building to the first trace of train_step
            self.build((None,) + tuple(images.shape[1:]))
        labels = self._check_labels(labels)
        collected: list = []
        z = self.embed_features(images, training=training, collected=collected)
        z, labels = _gather_global_batch(z, labels)
        batch = tf.shape(z)[0]
        if self.flow_min is None:
            terms = {"dml": _call_and_collect(self.loss_min, collected, l2_normalize(z), labels, training=training)}
        else:
            z = normalize_head_input(z, self.head_input_norm)
            terms = self._dueling_terms(z, labels, batch, collected, training)
        total = terms["dml"]
        if collected:
            total = total + tf.add_n([tf.cast(loss, total.dtype) for _, loss in collected])
        terms["loss"] = total
        return terms, collected

    def _dueling_terms(self, z, labels, batch, collected: list, training: bool) -> dict[str, tf.Tensor]:
        points, mask = self._regularized_points(z, labels)
        dml, reg_min, log_diag = self._head_terms(
            self.flow_min, self.reg_min, self.loss_min, points, labels, mask, batch, collected, training
        )
        terms = {"reg_min": reg_min, "log_scale_min": tf.reduce_max(tf.abs(log_diag))}
        if self.dueling:
            dml_2, reg_max, log_diag_2 = self._head_terms(
                self.flow_max, self.reg_max, self.loss_max, points, labels, mask, batch, collected, training
            )
            dml = dml + dml_2
            terms.update({"reg_max": reg_max, "log_scale_max": tf.reduce_max(tf.abs(log_diag_2))})
        terms["dml"] = dml
        return terms

    # ----------------------------------------------------------- training
    @property
    def metrics(self):
        trackers = [self.loss_tracker, self.dml_tracker, self.reg_min_tracker, self.reg_max_tracker]
        return [t for t in trackers if t is not None]

    def _update_trackers(self, terms: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        self.loss_tracker.update_state(terms["loss"])
        self.dml_tracker.update_state(terms["dml"])
        if self.reg_min_tracker is not None:
            self.reg_min_tracker.update_state(terms["reg_min"])
        if self.reg_max_tracker is not None:
            self.reg_max_tracker.update_state(terms["reg_max"])
        logs = {m.name: m.result() for m in self.metrics}
        if isinstance(self._distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Keras 3 reduces step logs across workers with reduce("MEAN", axis=0), which
            # fails on scalars (keras-team/keras#20585): hand it [1]-vectors, it returns scalars.
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    @staticmethod
    def _unpack(data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if y is None:
            raise ValueError("DRegModel needs (images, labels) batches; got images without labels.")
        if sample_weight is not None:
            raise ValueError(
                "DRegModel does not support sample_weight / class_weight: the base losses and the "
                "regulariser are batch-level terms. Balance classes with the batch sampler instead."
            )
        return x, y

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras' pre-``fit`` symbolic build, made to work under ``MultiWorkerMirroredStrategy``.

        Keras 3 (keras-team/keras#20585) averages the first distributed batch with
        ``strategy.reduce("MEAN", ...)`` only to learn its shapes and dtypes;
        ``CollectiveAllReduceStrategy`` cannot reduce a ``PerReplica`` of images and
        ``fit`` fails before the first step. One replica's local batch has the same
        structure, so it is used instead; other strategies keep Keras' path.
        """
        strategy = self._distribute_strategy
        if iterator is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        for _, _, it in iterator:
            batch = next(it)
            data_batch = tf.nest.map_structure(
                lambda v: strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues) else v,
                batch,
            )
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def fit(self, x=None, y=None, *args, **kwargs):
        """``keras.Model.fit`` with early, clear errors for empty or mis-shaped data.

        Raises:
            ValueError: the data is empty (or yielded no batch), or its images do
                not match the backbone's input shape.
        """
        self._check_fit_data(x)
        start = int(self.optimizer.iterations.numpy()) if self.optimizer is not None and self.optimizer.built else 0
        history = super().fit(x, y, *args, **kwargs)
        end = int(self.optimizer.iterations.numpy()) if self.optimizer is not None and self.optimizer.built else 0
        if end == start and history.epoch:
            raise ValueError(
                "model.fit ran no training step: the training data yielded no batch (empty dataset, "
                "or a filter/take that removed everything)."
            )
        return history

    def _check_fit_data(self, x) -> None:
        if isinstance(x, tf.data.Dataset):
            if int(x.cardinality()) == 0:
                raise ValueError("The training dataset is empty (cardinality 0): nothing to train on.")
            spec = x.element_spec
            image_spec = spec[0] if isinstance(spec, tuple) else spec
            if isinstance(image_spec, tf.TensorSpec) and image_spec.shape.rank is not None:
                self._check_image_shape(tuple(image_spec.shape))
        elif x is not None and hasattr(x, "shape") and hasattr(x, "__len__"):
            if len(x) == 0:
                raise ValueError("The training images are empty: nothing to train on.")
            self._check_image_shape((None,) + tuple(x.shape[1:]))

    def train_step(self, data):
        x, y = self._unpack(data)
        # Every update (BatchNorm statistics in the forward pass, weight decay and the optimizer
        # step) is made to depend on these checks, so a non-finite step changes nothing.
        input_checks = _assert_finite(x, "the input images")
        with tf.control_dependencies(input_checks), tf.GradientTape() as tape:
            terms, added = self.compute_dreg_losses_and_added(x, y, training=True)  # loss includes `added`
            total = terms["loss"]
            # Every replica computes the loss of the *global* batch (see _gather_global_batch) and
            # the optimizer sums gradients over replicas: divide by the replica count.
            scaled = self.optimizer.scale_loss(total / _num_replicas())
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        named = {**terms, **{f"add_loss term {i} of layer {name!r}": v for i, (name, v) in enumerate(added)}}
        present = [g for g in gradients if g is not None]
        if present and not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            # (a loss-scale optimizer expects and skips non-finite scaled gradients itself)
            named["gradients (global norm)"] = tf.linalg.global_norm(present)
        checks = _check_finite_terms(named)  # one check, naming every non-finite term
        with tf.control_dependencies(checks):
            self.optimizer.apply(gradients, variables)
        return self._update_trackers(terms)

    def test_step(self, data):
        x, y = self._unpack(data)
        return self._update_trackers(self.compute_dreg_losses(x, y, training=False))

    def compile(self, optimizer=None, **kwargs):
        """Compile with the paper's recipe (:func:`detreg_keras.optim.make_optimizer`) by default.

        ``loss`` is not accepted: the objective is fixed by the model (Eq. 11).
        """
        if kwargs.get("loss") is not None:
            raise ValueError("DRegModel computes its own loss (Eq. 11); choose the base loss with DRegModel(loss=...).")
        super().compile(optimizer=optimizer if optimizer is not None else make_optimizer(), **kwargs)

    def compile_from_config(self, config):
        """Re-compile on ``keras.models.load_model`` so training can resume with the saved optimizer."""
        config = keras.saving.deserialize_keras_object(config)
        config = {k: v for k, v in config.items() if k != "loss"}
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    # ------------------------------------------------------ serialisation
    def get_config(self) -> dict:
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "embedding_dim": self.embedding_dim,
            "embedding_activation": self.embedding_activation,
            "flow": self.flow_type,
            "num_couplings": self.num_couplings,
            "hidden_units": list(self.hidden_units),
            "log_scale_bound": self.log_scale_bound,
            "shift_bound": self.shift_bound,
            "head_input_norm": self.head_input_norm,
            "permutation_seed": self.permutation_seed,
            "dueling": self.dueling,
            "lambda_min": self.lambda_min,
            "lambda_max": self.lambda_max,
            "epsilon": self.epsilon,
            "regularizer_form": self.regularizer_form,
            "coupling_reduction": self.coupling_reduction,
            "flow_layout_version": LAYOUT_VERSION,
            "loss": self.loss_name,
            "loss_config": self.loss_config,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        check_layout_version(config.pop("flow_layout_version", None), f"DRegModel {config.get('name')!r}")
        # Files written before these options existed ran unbounded shifts on the raw z.
        for key, legacy in _LEGACY_HEAD_OPTIONS.items():
            config.setdefault(key, legacy)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"], custom_objects=custom_objects)
        return cls(**config)


#: Head options whose defaults changed in issue 13, with the value a saved config
#: that predates them (has no such key) was trained with.
_LEGACY_HEAD_OPTIONS: dict[str, Any] = {"shift_bound": None, "head_input_norm": "none"}


def load_model(path: str | os.PathLike, safe_mode: bool = True, compile: bool = True) -> keras.Model:
    """Load a saved ``.keras`` model with a clear error for missing or damaged files.

    The one loader of saved models (:func:`detreg_keras.export.load_model`
    calls it). Keras' ``safe_mode`` (no arbitrary code from ``lambda`` layers)
    stays on by default; the custom layers of this package are registered, so
    they load without it.

    Args:
        path: the ``.keras`` file, or a run directory holding ``model.keras``.
        safe_mode: passed to ``keras.models.load_model``.
        compile: re-compile with the saved optimizer (to resume training).

    Raises:
        TypeError: ``path`` is not a ``str`` or ``os.PathLike``.
        FileNotFoundError: no such file (or the run directory has no ``model.keras``).
        ValueError: the file is not a complete ``.keras`` archive (truncated,
            corrupt or another format).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Expected a .keras file or a run directory, got {type(path).__name__}.")
    path = Path(path)
    if path.is_dir():
        if not (path / "model.keras").is_file():
            raise FileNotFoundError(f"Run directory {path} has no model.keras.")
        path = path / "model.keras"
    if not path.is_file():
        raise FileNotFoundError(f"No saved model at {path}.")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            damaged = archive.testzip()
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not a valid .keras archive (truncated or corrupt file): {err}") from err
    missing = sorted({"config.json", "model.weights.h5"} - names)
    if damaged is not None or missing:
        problem = f"damaged member {damaged!r}" if damaged is not None else f"no {', '.join(missing)}"
        raise ValueError(
            f"{path} is an incomplete .keras archive ({problem}; members {sorted(names)}); "
            "it may have been truncated while copying or saving: save or copy the model again."
        )
    return keras.models.load_model(path, safe_mode=safe_mode, compile=compile)
