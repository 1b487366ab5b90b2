"""Recall@k surrogate loss (RS@k) with similarity mixup (SiMix).

Patel, Tolias & Matas, "Recall@k Surrogate Loss with Large Batches and
Similarity Mixup" (CVPR 2022) and its extension "Three Things to Know about
Deep Metric Learning" (2024). Every sample of the batch is in turn a query
``q``; the rest of the batch ``Ω_q`` is its database and ``P_q ⊂ Ω_q`` its
positives. With cosine similarities ``s_qz`` of L2-normalised embeddings and
``σ_τ(u) = 1 / (1 + exp(-u / τ))``:

    r(q, x)   = 1 + Σ_{z ∈ Ω_q, z ≠ x} σ_τ2(s_qz - s_qx)                 (smoothed rank)
    R_k(q)    = min(Σ_{x ∈ P_q} σ_τ1(k - r(q, x)), k) / min(k, |P_q|)     (smoothed recall@k)
    L         = 1/|Q| Σ_{q ∈ Q} (1 - 1/|K| Σ_{k ∈ K} R_k(q))

with ``τ1 = 1``, ``τ2 = 0.01``, ``K = {1, 2, 4, 8, 16}`` (the paper's values)
and ``Q`` the queries that have at least one positive (others contribute 0).
Unlike the official code (``yash0307/RecallatK_surrogate``), which also counts
the query itself in the database, the query is excluded from ``Ω_q``, as in
the paper's definition.

SiMix: for every pair ``(i, j)`` of same-class samples a
virtual sample ``v = α x̂_i + (1 - α) x̂_j``, ``α ~ U(0, 1)``, is added with
their label, *without* re-normalisation, so its similarities are mixtures of
scalar similarities: ``s(v, z) = α s_iz + (1 - α) s_jz`` and
``s(v, v') = Σ α_a α'_b s_ab``. In matrix form, with the mixing matrix
``A = [I; M]``, the extended similarity matrix is ``A S Aᵀ``. Virtual samples
act as queries, positives and negatives, like in the official code.

Memory: the ranks need a ``[queries, N, N]`` tensor (``N`` = batch plus
virtual samples). With ``chunk_size`` the loss is evaluated over chunks of
queries inside a ``tf.custom_gradient``: the forward pass computes, chunk by
chunk, the loss and its gradient with respect to the (mixed) embeddings, so
only one chunk's ``[chunk, N, N]`` tensors are alive at a time; the backward
pass hands that gradient to the network (the two-pass scheme of the paper's
Algorithm 1, whose second pass is ordinary backpropagation here).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from detreg_keras.losses import _pairs
from detreg_keras.losses.base import DMLLoss

DEFAULT_K_VALUES = (1, 2, 4, 8, 16)


def simix_mixing_matrix(labels: tf.Tensor, seed: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """SiMix mixing matrix ``A = [I; M]`` and the extended labels.

    ``M`` has one row per unordered same-class pair ``(i, j)``, ``i < j``, with
    ``α`` in column ``i`` and ``1 - α`` in column ``j``, ``α ~ U(0, 1)``.

    Args:
        labels: ``[B]`` integer labels.
        seed: optional stateless seed (int ``[2]``); ``None`` uses the global generator.

    Returns:
        ``(A [B + V, B] float32, labels [B + V] int32)`` where ``V`` is the number of
        same-class pairs.
    """
    labels = _pairs.flat_labels(labels)
    b = tf.shape(labels)[0]
    upper = tf.linalg.band_part(tf.ones([b, b], tf.bool), 0, -1)
    upper = tf.logical_and(upper, tf.logical_not(tf.eye(b, dtype=tf.bool)))
    pairs = tf.cast(tf.where(tf.logical_and(_pairs.same_label_matrix(labels), upper)), tf.int32)  # [V, 2]
    alpha = _pairs.stateless_or_random_uniform(tf.shape(pairs)[:1], seed)
    mix = alpha[:, None] * tf.one_hot(pairs[:, 0], b) + (1.0 - alpha)[:, None] * tf.one_hot(pairs[:, 1], b)
    mixing = tf.concat([tf.eye(b), mix], axis=0)
    return mixing, tf.concat([labels, tf.gather(labels, pairs[:, 0])], axis=0)


def recall_at_k_query_losses(
    embeddings: tf.Tensor,
    labels: tf.Tensor,
    query_indices: tf.Tensor,
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    tau1: float = 1.0,
    tau2: float = 0.01,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-query RS@k losses ``1 - mean_k R_k(q)`` for the queries ``query_indices``.

    Args:
        embeddings: ``[N, D]`` embeddings, used as they are (no normalisation:
            SiMix's virtual samples must not be re-normalised).
        labels: ``[N]`` integer labels.
        query_indices: ``[Q]`` int32 rows of ``embeddings`` used as queries.
        k_values: the ``k`` of the recall@k terms.
        tau1: temperature of the recall sigmoid.
        tau2: temperature of the rank sigmoid.

    Returns:
        ``(losses [Q], valid [Q])``: the loss of each query (0 where invalid) and
        whether it has at least one positive.
    """
    labels = _pairs.flat_labels(labels)
    n = tf.shape(embeddings)[0]
    queries = tf.gather(embeddings, query_indices)
    sim = tf.matmul(queries, embeddings, transpose_b=True)  # [Q, N]
    not_self = tf.not_equal(query_indices[:, None], tf.range(n)[None, :])  # [Q, N]
    pos = tf.logical_and(tf.equal(tf.gather(labels, query_indices)[:, None], labels[None, :]), not_self)
    # rank of x: 1 + Σ_{z ≠ q, z ≠ x} σ((s_qz - s_qx) / τ2)
    diff = sim[:, None, :] - sim[:, :, None]  # [Q, x, z]
    others = tf.logical_and(not_self[:, None, :], tf.logical_not(tf.eye(n, dtype=tf.bool))[None, :, :])
    rank = 1.0 + tf.reduce_sum(tf.sigmoid(diff / tau2) * tf.cast(others, sim.dtype), axis=2)  # [Q, N]
    ks = tf.constant([float(k) for k in k_values], tf.float32)
    in_top_k = tf.sigmoid((ks[None, None, :] - rank[:, :, None]) / tau1)  # [Q, N, K]
    recall = tf.reduce_sum(in_top_k * tf.cast(pos, sim.dtype)[:, :, None], axis=1)  # [Q, K]
    num_pos = tf.reduce_sum(tf.cast(pos, sim.dtype), axis=1)  # [Q]
    recall = tf.math.divide_no_nan(tf.minimum(recall, ks[None, :]), tf.minimum(ks[None, :], num_pos[:, None]))
    valid = num_pos > 0
    losses = tf.where(valid, 1.0 - tf.reduce_mean(recall, axis=1), tf.zeros_like(num_pos))
    return losses, valid


def _count_valid_queries(labels: tf.Tensor) -> tf.Tensor:
    """Number of samples whose class occurs at least twice (queries with a positive)."""
    counts = tf.reduce_sum(tf.cast(_pairs.same_label_matrix(labels), tf.float32), axis=1)
    return tf.reduce_sum(tf.cast(counts > 1, tf.float32))


def _chunked_recall_at_k(
    embeddings: tf.Tensor, labels: tf.Tensor, k_values: Sequence[int], tau1: float, tau2: float, chunk_size: int
) -> tf.Tensor:
    """Mean RS@k over the valid queries, forward and gradient computed per query chunk."""
    n_valid = tf.maximum(_count_valid_queries(labels), 1.0)

    @tf.custom_gradient
    def _loss(x):
        plain = tf.stop_gradient(x)  # the outer tape must not keep the chunks' activations
        n = tf.shape(plain)[0]
        num_chunks = (n + chunk_size - 1) // chunk_size

        def body(i, total, grad):
            # fixed-size chunks (XLA needs static shapes); the last one is padded and masked.
            idx = i * chunk_size + tf.range(chunk_size)
            in_range = idx < n
            with tf.GradientTape() as tape:
                tape.watch(plain)
                losses, _ = recall_at_k_query_losses(plain, labels, tf.minimum(idx, n - 1), k_values, tau1, tau2)
                chunk_total = tf.reduce_sum(tf.where(in_range, losses, tf.zeros_like(losses)))
            return i + 1, total + chunk_total, grad + tape.gradient(chunk_total, plain)

        _, total, grad = tf.while_loop(
            lambda i, total, grad: i < num_chunks,
            body,
            (tf.constant(0), tf.constant(0.0), tf.zeros_like(plain)),
        )

        def grad_fn(upstream):
            return upstream * grad / n_valid

        return total / n_valid, grad_fn

    return _loss(embeddings)


def recall_at_k_loss(
    embeddings: tf.Tensor,
    labels: tf.Tensor,
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    tau1: float = 1.0,
    tau2: float = 0.01,
    simix: bool = False,
    chunk_size: int | None = None,
    seed: tf.Tensor | None = None,
) -> tf.Tensor:
    """RS@k loss of a batch, optionally with SiMix and chunked backward (module docstring).

    Args:
        embeddings: ``[B, D]`` embeddings (normalised inside).
        labels: ``[B]`` integer labels.
        k_values: the ``k`` values (``1, 2, 4, 8, 16``).
        tau1: temperature of the recall sigmoid (1).
        tau2: temperature of the rank sigmoid (0.01).
        simix: add the SiMix virtual samples (one per same-class pair).
        chunk_size: evaluate the loss and its gradient over chunks of this many
            queries (bounded memory); ``None`` computes all queries at once.
        seed: stateless seed (int ``[2]``) of SiMix's mixing weights; ``None``
            draws from the global generator.

    Returns:
        Scalar loss in ``[0, 1]``, 0 when no query has a positive.
    """
    labels = _pairs.flat_labels(labels)
    x = _pairs.l2_normalize(embeddings)
    if simix:
        mixing, labels = simix_mixing_matrix(labels, seed)
        x = tf.matmul(mixing, x)  # virtual samples are not re-normalised: s(v, ·) mixes similarities
    if chunk_size is not None:
        return _chunked_recall_at_k(x, labels, tuple(k_values), float(tau1), float(tau2), int(chunk_size))
    losses, _ = recall_at_k_query_losses(x, labels, tf.range(tf.shape(x)[0]), k_values, tau1, tau2)
    return tf.reduce_sum(losses) / tf.maximum(_count_valid_queries(labels), 1.0)


@keras.saving.register_keras_serializable(package="detreg_keras")
class RecallAtKLoss(DMLLoss):
    """Keras wrapper of :func:`recall_at_k_loss` (registry name ``"recall_at_k"``).

    Args:
        num_classes: unused (pair-based), kept for the common interface.
        embedding_dim: unused (pair-based), kept for the common interface.
        k_values: the ``k`` values (default ``(1, 2, 4, 8, 16)``).
        tau1: recall sigmoid temperature (default 1).
        tau2: rank sigmoid temperature (default 0.01).
        simix: add SiMix virtual samples (default False).
        chunk_size: query chunk size of the bounded-memory path (default ``None``: one chunk).
        seed: seed of SiMix's mixing weights (a ``keras.random.SeedGenerator``).
        **kwargs: passed to :class:`DMLLoss`.
    """

    metric_name = "rsk_loss"
    loss_fn = staticmethod(recall_at_k_loss)

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        k_values: Sequence[int] = DEFAULT_K_VALUES,
        tau1: float = 1.0,
        tau2: float = 0.01,
        simix: bool = False,
        chunk_size: int | None = None,
        seed: int | None = None,
        **kwargs,
    ):
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size!r}.")
        if len(k_values) == 0:
            raise ValueError("k_values must not be empty.")
        hyper = {
            "k_values": tuple(int(k) for k in k_values),
            "tau1": float(tau1),
            "tau2": float(tau2),
            "simix": bool(simix),
            "chunk_size": None if chunk_size is None else int(chunk_size),
            "seed": seed,
        }
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper=hyper, **kwargs)

    def uses_seed_generator(self) -> bool:
        """Only SiMix draws random numbers."""
        return self.simix
