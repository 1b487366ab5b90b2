"""Cross-batch memory (XBM; Wang, Zhang, Huang & Scott, CVPR 2020) for the pair losses.

A pair loss normally pairs each sample of a batch with the other samples of
the same batch. XBM keeps the embeddings and labels of the last ``M`` training
samples in a first-in-first-out queue (the *memory*) and pairs each sample of
the batch, the *queries* ``Q``, with the batch *and* the memory, the *keys*

    K = Q ∪ {memory slots filled so far},   self-pairs (q_i, q_i) excluded,

so a batch of ``B`` sees ``B + M - 1`` candidates instead of ``B - 1``. The
loss is the wrapped loss's formula over the ``[B, B + M]`` query-key pairs:
its positives ``P_ij`` (same label) and negatives ``N_ij`` (other label)
simply range over the keys. Memory entries are constants (no gradient flows
into them; the paper's "slow drift" argument is why stale features still help),
and the batch is enqueued *after* its loss, overwriting the oldest slots.
This is the one-loss form of pytorch-metric-learning's ``CrossBatchMemory``;
the authors' code (MalongTech/research-xbm) instead adds a separately weighted
batch-versus-memory term to the batch loss.

The memory is held in non-trainable float32 variables (also under mixed
precision): embeddings ``[M, d]``, labels ``[M]``, the write pointer, the
number of filled slots and the number of training calls; they are saved with
the model's weights, so ``model.save`` / ``BackupAndRestore`` restore the same
queue. ``start_step`` (the paper warms up before switching XBM on) keeps the
memory out of the loss for the first training calls while it fills.

Under ``tf.distribute`` the layer all-gathers the replicas' batches
(``all_gather=True``), so every replica enqueues the same *global* batch in the
same order and holds the same queue (the variables use
``ONLY_FIRST_REPLICA`` aggregation); it then returns the loss of the global
batch on every replica, the convention of ``DRegModel``: divide it by the
replica count before the gradients are summed. ``DRegModel`` gathers the batch
itself and builds this layer with ``all_gather=False``.

Supported losses (:data:`SUPPORTED_LOSSES`): ``contrastive``, ``triplet``,
``multi_similarity``, ``circle``; others raise a ``ValueError``. Outside
training (``training`` falsy, e.g. ``model.evaluate``) the layer returns the
wrapped loss of the batch alone and leaves the memory untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from detreg_keras.losses import _pairs
from detreg_keras.losses.base import DMLLoss
from detreg_keras.losses.circle import CircleLoss, circle_loss_from_masks
from detreg_keras.losses.contrastive import ContrastiveLoss, contrastive_loss_from_masks
from detreg_keras.losses.multi_similarity import MultiSimilarityLoss, multi_similarity_loss_from_masks
from detreg_keras.losses.triplet import TripletMarginLoss, triplet_loss_from_masks


# ------------------------------------------------------------- query-key math
def cross_distance(queries: tf.Tensor, keys: tf.Tensor, squared: bool = False) -> tf.Tensor:
    """Euclidean distances ``[Q, K]`` between the L2-normalised rows of ``queries`` and ``keys``.

    The rectangular form of :func:`detreg_keras.losses._pairs.pairwise_distance`
    (same value on ``keys = queries`` off the diagonal; value and gradient 0
    where the points coincide).
    """
    q, k = _pairs.l2_normalize(queries), _pairs.l2_normalize(keys)
    d2 = tf.reduce_sum(tf.square(q), -1)[:, None] + tf.reduce_sum(tf.square(k), -1)[None, :]
    d2 = tf.maximum(d2 - 2.0 * tf.matmul(q, k, transpose_b=True), 0.0)
    return d2 if squared else _pairs.safe_sqrt(d2)


def cross_similarity(queries: tf.Tensor, keys: tf.Tensor) -> tf.Tensor:
    """Cosine similarities ``[Q, K]`` of the rows of ``queries`` and ``keys``."""
    return tf.matmul(_pairs.l2_normalize(queries), _pairs.l2_normalize(keys), transpose_b=True)


def query_key_masks(
    labels: tf.Tensor, key_labels: tf.Tensor, key_valid: tf.Tensor | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Positive and negative masks ``[Q, K]`` of queries against keys whose first ``Q`` rows are the queries.

    Args:
        labels: ``[Q]`` query labels.
        key_labels: ``[K]`` key labels, ``K >= Q``; key ``i < Q`` is query ``i`` itself.
        key_valid: optional ``[K]`` boolean; invalid keys (empty memory slots) enter no pair.

    Returns:
        ``(pos, neg)``: ``pos[i, j]`` same label and ``j != i``; ``neg[i, j]`` other label.
    """
    labels, key_labels = _pairs.flat_labels(labels), _pairs.flat_labels(key_labels)
    same = tf.equal(labels[:, None], key_labels[None, :])
    not_self = tf.logical_not(tf.eye(tf.shape(labels)[0], tf.shape(key_labels)[0], dtype=tf.bool))
    valid = tf.ones_like(same) if key_valid is None else tf.broadcast_to(key_valid[None, :], tf.shape(same))
    return tf.logical_and(tf.logical_and(same, not_self), valid), tf.logical_and(tf.logical_not(same), valid)


def _contrastive(queries, keys, pos, neg, **hyper):
    return contrastive_loss_from_masks(cross_distance(queries, keys), pos, neg, **hyper)


def _triplet(queries, keys, pos, neg, margin=0.2, mining="all", squared=False):
    return triplet_loss_from_masks(cross_distance(queries, keys, squared), pos, neg, margin=margin, mining=mining)


def _multi_similarity(queries, keys, pos, neg, **hyper):
    return multi_similarity_loss_from_masks(cross_similarity(queries, keys), pos, neg, **hyper)


def _circle(queries, keys, pos, neg, **hyper):
    return circle_loss_from_masks(cross_similarity(queries, keys), pos, neg, **hyper)


class _Supported(NamedTuple):
    layer: type
    fn: Callable[..., tf.Tensor]
    hyper_parameters: tuple[str, ...]


#: Losses XBM can wrap: registry name -> (loss class, query-key function, its hyper-parameters).
SUPPORTED_LOSSES: dict[str, _Supported] = {
    "contrastive": _Supported(ContrastiveLoss, _contrastive, ("pos_margin", "neg_margin", "power")),
    "triplet": _Supported(TripletMarginLoss, _triplet, ("margin", "mining", "squared")),
    "multi_similarity": _Supported(MultiSimilarityLoss, _multi_similarity, ("alpha", "beta", "base", "epsilon")),
    "circle": _Supported(CircleLoss, _circle, ("margin", "gamma")),
}


def _unsupported(what: str) -> ValueError:
    return ValueError(
        f"CrossBatchMemory cannot wrap {what}: it needs a pair loss that takes separate query and key sets. "
        f"Supported losses: {sorted(SUPPORTED_LOSSES)}. (Proxy-based losses compare samples with proxies, "
        "not with other samples, so a memory of past embeddings does not apply to them.)"
    )


def cross_batch_loss(
    loss: str,
    embeddings: tf.Tensor,
    labels: tf.Tensor,
    ref_embeddings: tf.Tensor,
    ref_labels: tf.Tensor,
    ref_valid: tf.Tensor | None = None,
    **hyper_parameters: Any,
) -> tf.Tensor:
    """Pair loss of the batch (queries) against the batch and a reference set (keys = batch ∪ reference).

    Args:
        loss: a key of :data:`SUPPORTED_LOSSES`.
        embeddings: ``[B, D]`` batch embeddings (normalised inside).
        labels: ``[B]`` integer labels.
        ref_embeddings: ``[M, D]`` reference embeddings (the memory); treated as constants.
        ref_labels: ``[M]`` their labels.
        ref_valid: optional ``[M]`` boolean: which reference rows exist (empty slots enter no pair).
        **hyper_parameters: the loss's own (as in its constructor, e.g. ``neg_margin``).

    Returns:
        Scalar loss; with an empty (or all-invalid) reference it equals the loss of the batch alone.

    Raises:
        ValueError: ``loss`` is not supported.
    """
    if loss not in SUPPORTED_LOSSES:
        raise _unsupported(repr(loss))
    embeddings = tf.cast(embeddings, tf.float32)
    keys = tf.concat([embeddings, tf.stop_gradient(tf.cast(ref_embeddings, tf.float32))], axis=0)
    key_labels = tf.concat([_pairs.flat_labels(labels), _pairs.flat_labels(ref_labels)], axis=0)
    key_valid = None
    if ref_valid is not None:
        key_valid = tf.concat([tf.ones_like(_pairs.flat_labels(labels), tf.bool), tf.cast(ref_valid, tf.bool)], 0)
    pos, neg = query_key_masks(labels, key_labels, key_valid)
    return SUPPORTED_LOSSES[loss].fn(embeddings, keys, pos, neg, **hyper_parameters)


# ---------------------------------------------------------------- the layer
def _check_count(value: Any, name: str, minimum: int, meaning: str) -> int:
    """``value`` as an ``int >= minimum``, or a ``ValueError`` naming the argument and the value."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not numeric or not float(value).is_integer() or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} ({meaning}), got {value!r}.")
    return int(value)


def _supported_name(base_loss: DMLLoss) -> str:
    for name, entry in SUPPORTED_LOSSES.items():
        if type(base_loss) is entry.layer:  # exact type: a subclass may change the formula
            return name
    raise _unsupported(f"{type(base_loss).__name__}")


def _build_base_loss(loss: Any, loss_config: dict | None, num_classes, embedding_dim, name: str) -> DMLLoss:
    """The wrapped loss layer from a registry name (and its hyper-parameters) or a loss layer."""
    if isinstance(loss, str):
        from detreg_keras.losses import get  # noqa: PLC0415 (the registry imports this module)

        key = loss.lower().replace("-", "_")
        if key not in SUPPORTED_LOSSES:
            raise _unsupported(repr(loss))
        return get(key, num_classes=num_classes, embedding_dim=embedding_dim, name=name, **(loss_config or {}))
    if loss_config:
        raise ValueError("loss_config applies to a loss given by name; configure a loss layer when creating it.")
    if not isinstance(loss, DMLLoss):
        raise TypeError(f"loss must be a loss name or a DMLLoss layer, got {type(loss).__name__}.")
    return loss


@keras.saving.register_keras_serializable(package="detreg_keras")
class CrossBatchMemory(DMLLoss):
    """A pair loss over the batch and a queue of past embeddings (XBM; registry name ``"xbm"``).

    ``loss = layer(embeddings, labels, training=True)`` computes the wrapped
    loss with the batch as queries and batch ∪ memory as keys (see the module
    docstring), then enqueues the batch. With ``training`` falsy it returns the
    wrapped loss of the batch alone and changes nothing.

    Args:
        num_classes: passed to a loss given by name (pair losses ignore it).
        embedding_dim: ``d`` of the memory; taken from the first input when ``None``.
        loss: the wrapped pair loss (default MS): a name of :data:`SUPPORTED_LOSSES` or a layer of one
            of those classes (``get_config`` stores its name and hyper-parameters).
        memory_size: ``M``, past embeddings kept; must be at least the (global) batch size.
        start_step: training calls before the memory enters the loss (it fills meanwhile).
        loss_config: hyper-parameters of a loss given by name (e.g. ``{"neg_margin": 0.5}``).
        all_gather: under ``tf.distribute``, all-gather the replicas' batches first
            (``DRegModel``, which passes the global batch already, sets ``False``).
        **kwargs: passed to :class:`DMLLoss` (``name`` ...).

    Raises:
        ValueError: ``memory_size <= 0`` or not an integer, ``start_step < 0``, an
            unsupported loss; at call time, a batch larger than ``memory_size``.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        loss: str | DMLLoss = "multi_similarity",
        memory_size: int = 1024,
        start_step: int = 0,
        loss_config: dict[str, Any] | None = None,
        all_gather: bool = True,
        **kwargs,
    ):
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, **kwargs)
        self.memory_size = _check_count(
            memory_size, "memory_size", 1, "the number of past embeddings kept; the XBM paper keeps several batches"
        )
        self.start_step = _check_count(start_step, "start_step", 0, "training calls before the memory is used")
        self.all_gather = bool(all_gather)
        self.base_loss = _build_base_loss(loss, loss_config, num_classes, embedding_dim, f"{self.name}_base")
        self.base_name = _supported_name(self.base_loss)
        self.metric_name = self.base_loss.metric_name  # logs keep the wrapped loss's name

    def _hyper_parameters(self) -> dict[str, Any]:
        config = self.base_loss.get_config()
        return {key: config[key] for key in SUPPORTED_LOSSES[self.base_name].hyper_parameters}

    def build(self, input_shape=None):
        dim = None if input_shape is None else input_shape[-1]
        if self.embedding_dim is None and dim is None:
            raise ValueError("CrossBatchMemory needs embedding_dim (or an input with a known last dimension).")
        if self.embedding_dim is not None and dim is not None and int(dim) != self.embedding_dim:
            raise ValueError(f"CrossBatchMemory: embeddings have dimension {dim}, embedding_dim={self.embedding_dim}.")
        self.embedding_dim = int(dim if dim is not None else self.embedding_dim)
        state = {"trainable": False, "initializer": "zeros", "aggregation": "only_first_replica"}
        m = self.memory_size
        self.memory_embeddings = self.add_weight(shape=(m, self.embedding_dim), dtype="float32", name="memory", **state)
        self.memory_labels = self.add_weight(shape=(m,), dtype="int32", name="memory_labels", **state)
        self.write_pointer = self.add_weight(shape=(), dtype="int32", name="write_pointer", **state)
        self.filled = self.add_weight(shape=(), dtype="int32", name="filled", **state)
        self.steps = self.add_weight(shape=(), dtype="int32", name="steps", **state)
        if not self.base_loss.built:
            self.base_loss.build(input_shape)
        self.built = True

    def call(self, embeddings, labels, training=None):
        embeddings = tf.cast(embeddings, tf.float32)
        labels = _pairs.flat_labels(labels)
        self._check_shapes(embeddings, labels)
        if self.all_gather:
            # imported here: the model imports the losses
            from detreg_keras.model import _gather_global_batch  # noqa: PLC0415 (model imports the losses)

            embeddings, labels = _gather_global_batch(embeddings, labels)
        if not training:
            return self.base_loss(embeddings, labels)
        checks = self._check_batch_size(embeddings)
        with tf.control_dependencies(checks):
            in_use = tf.logical_and(tf.range(self.memory_size) < self.filled, self.steps >= self.start_step)
            loss = cross_batch_loss(
                self.base_name,
                embeddings,
                labels,
                tf.convert_to_tensor(self.memory_embeddings),
                tf.convert_to_tensor(self.memory_labels),
                in_use,
                **self._hyper_parameters(),
            )
        with tf.control_dependencies([loss]):
            self._enqueue(embeddings, labels)
        return loss

    def compute(self, embeddings, labels):
        """The wrapped loss of the batch alone (what ``training=False`` returns)."""
        return self.base_loss(embeddings, labels)

    def _check_batch_size(self, embeddings: tf.Tensor) -> list:
        message = (
            f"CrossBatchMemory: memory_size={self.memory_size} is smaller than the (global) batch of "
            "{} embeddings; the queue must hold at least one batch: raise memory_size (the XBM paper keeps "
            "several batches) or lower the batch size."
        )
        batch = embeddings.shape[0]
        if batch is not None and batch > self.memory_size:
            raise ValueError(message.format(batch))
        op = tf.debugging.assert_less_equal(
            tf.shape(embeddings)[0], self.memory_size, message=message.format("more")
        )
        return [] if op is None else [op]

    def _enqueue(self, embeddings: tf.Tensor, labels: tf.Tensor) -> None:
        """Write the batch over the oldest slots (a ring buffer) and advance the counters."""
        batch = tf.shape(embeddings)[0]
        slots = ((self.write_pointer + tf.range(batch)) % self.memory_size)[:, None]
        memory = tf.convert_to_tensor(self.memory_embeddings)
        self.memory_embeddings.assign(tf.tensor_scatter_nd_update(memory, slots, tf.stop_gradient(embeddings)))
        self.memory_labels.assign(tf.tensor_scatter_nd_update(tf.convert_to_tensor(self.memory_labels), slots, labels))
        self.write_pointer.assign((self.write_pointer + batch) % self.memory_size)
        self.filled.assign(tf.minimum(self.filled + batch, self.memory_size))
        self.steps.assign(self.steps + 1)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "loss": self.base_name,
                "memory_size": self.memory_size,
                "start_step": self.start_step,
                "loss_config": self._hyper_parameters(),
                "all_gather": self.all_gather,
            }
        )
        return config
