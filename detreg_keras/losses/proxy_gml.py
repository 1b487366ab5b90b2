"""ProxyGML (Zhu, Yang, Yao & Tong, NeurIPS 2020): graph metric learning with fewer proxies.

Each class ``c`` owns ``N`` learnable proxies ``w_c^k`` (rows ``c N .. c N + N - 1``
of a ``[C N, D]`` weight), unit-normalised. For L2-normalised embeddings:

1. *Directed similarity graph* sample → proxy: ``S_ij = x̂_iᵀ ŵ_j``, ``[B, C N]``.
2. *Relation-guided sub-graph*: per sample keep the ``k = ceil(r C N)`` edges with
   the largest ``S_ij + 1000 · 1[class(j) = y_i]``, i.e. all (or, if ``k < N``, the
   ``k`` most similar) positive proxies first, then the most similar negative
   proxies: ``A_ij = S_ij`` on the kept edges, 0 elsewhere.
3. *Reverse label propagation*: the proxies' one-hot labels ``Y`` ([C N, C])
   propagate to the sample, ``z_i = A_i Y`` (``z_ic`` = sum of the kept
   similarities to class ``c``'s proxies), and a softmax restricted to the classes
   present in the sub-graph gives the prediction ``p_ic``:

       L_cls = 1/B Σ_i -log( exp(z_{i y_i}) / Σ_{c ∈ G_i} exp(z_ic) )

4. *Proxy regularisation*: each proxy is classified by its similarities to all
   proxies, ``u_j = (ŴŴᵀ)_j Y`` ([C]), with a full softmax:

       L_reg = 1/(C N) Σ_j -log softmax(u_j)_{class(j)}

   ``L = L_cls + λ L_reg``.

This follows the official ``ProxyGML.forward`` (``YuehuaZhu/ProxyGML``,
``loss/ProxyGML.py``) as we know it. Differences: the official masked softmax is
``exp(z) · 1[z ≠ 0] / (1e-8 + Σ …)`` then ``log(p + 1e-20)``; here the mask is "class
has a kept edge" (the same except when kept similarities sum to exactly 0) and the
log-softmax is computed stably without the epsilons. The official code also
normalises the proxies over the embedding axis of a ``[D, C N]`` tensor, which is
our row normalisation of ``[C N, D]``. Ties in the top-k may keep different
(equal-valued) edges than PyTorch's ``topk``. Defaults ``N = 12``, ``r = 0.05``,
``λ = 0.3`` are the values we recall from the paper's CUB setting; check them
against the official scripts before a benchmark study.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from detreg_keras.losses import _pairs
from detreg_keras.losses.base import ProxyLoss


def subgraph_size(num_classes: int, proxies_per_class: int, r: float) -> int:
    """``k = ceil(r C N)``, the number of proxies kept per sample (at least 1, at most ``C N``)."""
    total = int(num_classes) * int(proxies_per_class)
    return max(1, min(total, int(math.ceil(float(r) * total - 1e-9))))


def proxy_gml_loss(
    embeddings: tf.Tensor,
    labels: tf.Tensor,
    proxies: tf.Tensor,
    proxies_per_class: int = 12,
    r: float = 0.05,
    weight_lambda: float = 0.3,
) -> tf.Tensor:
    """ProxyGML loss of a batch (see the module docstring).

    Args:
        embeddings: ``[B, D]`` embeddings (normalised inside).
        labels: ``[B]`` integer labels in ``[0, C)``.
        proxies: ``[C N, D]`` proxies, class ``c``'s in rows ``c N .. c N + N - 1``
            (normalised inside); ``C N`` must be static.
        proxies_per_class: ``N`` (>= 1).
        r: share of the ``C N`` proxies kept per sample (``0 < r <= 1``).
        weight_lambda: λ, weight of the proxy regulariser.

    Returns:
        Scalar loss ``L_cls + λ L_reg``.
    """
    n = int(proxies_per_class)
    if n < 1:
        raise ValueError(f"ProxyGML needs proxies_per_class >= 1, got {proxies_per_class!r}.")
    if not 0.0 < float(r) <= 1.0:
        raise ValueError(f"ProxyGML needs 0 < r <= 1, got {r!r}.")
    total = proxies.shape[0]
    if total is None or int(total) % n:
        raise ValueError(f"ProxyGML needs a static number of proxies divisible by proxies_per_class={n}, got {total}.")
    num_classes = int(total) // n
    labels = _pairs.flat_labels(labels)
    centers = _pairs.l2_normalize(proxies)
    sim = tf.matmul(_pairs.l2_normalize(embeddings), centers, transpose_b=True)  # [B, C N]
    proxy_labels = tf.repeat(tf.range(num_classes), n)  # [C N]
    proxy_onehot = tf.one_hot(proxy_labels, num_classes, dtype=tf.float32)  # [C N, C]
    positive = tf.cast(tf.equal(labels[:, None], proxy_labels[None, :]), tf.float32)
    k = subgraph_size(num_classes, n, r)
    _, top = tf.math.top_k(tf.stop_gradient(sim) + 1000.0 * positive, k=k)
    batch = tf.shape(sim)[0]
    rows = tf.repeat(tf.range(batch), k)
    kept = tf.scatter_nd(  # [B, C N] 0/1: the kept edges
        tf.stack([rows, tf.reshape(top, [-1])], axis=1), tf.ones([batch * k]), tf.shape(sim)
    )
    logits = tf.matmul(kept * sim, proxy_onehot)  # [B, C]: reverse label propagation
    in_graph = tf.matmul(kept, proxy_onehot) > 0
    target = tf.one_hot(labels, num_classes, dtype=tf.float32)
    log_norm = _pairs.masked_logsumexp(logits, in_graph, axis=1)
    cls = tf.reduce_mean(log_norm - tf.reduce_sum(logits * target, axis=1))
    if not weight_lambda:
        return cls
    center_logits = tf.matmul(tf.matmul(centers, centers, transpose_b=True), proxy_onehot)  # [C N, C]
    reg = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=proxy_labels, logits=center_logits))
    return cls + weight_lambda * reg


@keras.saving.register_keras_serializable(package="detreg_keras")
class ProxyGMLLoss(ProxyLoss):
    """Keras wrapper of :func:`proxy_gml_loss` (registry name ``"proxy_gml"``).

    Owns a ``[C N, D]`` weight named ``proxies``, initialised like the official
    ``kaiming_uniform_(a=sqrt(5))`` of a ``[D, C N]`` tensor: ``U(±1/sqrt(C N))``.

    Args:
        num_classes: number of training classes ``C``.
        embedding_dim: embedding dimension ``D``.
        proxies_per_class: ``N`` (default 12).
        r: share of proxies kept in each sample's sub-graph (default 0.05).
        weight_lambda: λ of the proxy regulariser (default 0.3).
        **kwargs: passed to :class:`DMLLoss`.
    """

    metric_name = "proxy_gml_loss"
    loss_fn = staticmethod(proxy_gml_loss)
    proxy_init = "uniform"

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        proxies_per_class: int = 12,
        r: float = 0.05,
        weight_lambda: float = 0.3,
        **kwargs,
    ):
        if proxies_per_class is None or int(proxies_per_class) < 1:
            raise ValueError(f"ProxyGMLLoss needs proxies_per_class >= 1, got {proxies_per_class!r}.")
        if not 0.0 < float(r) <= 1.0:
            raise ValueError(f"ProxyGMLLoss needs 0 < r <= 1 (share of proxies per sub-graph), got {r!r}.")
        hyper = {"proxies_per_class": int(proxies_per_class), "r": float(r), "weight_lambda": float(weight_lambda)}
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper=hyper, **kwargs)

    def num_proxies(self) -> int:
        return self.num_classes * self.proxies_per_class
