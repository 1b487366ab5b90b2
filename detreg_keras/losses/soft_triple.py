"""SoftTriple loss (Qian et al., ICCV 2019).

Each class ``c`` has ``K`` centers ``w_c^k`` (unit-normalised). With the cosine
``x̂ᵀw_c^k`` of an L2-normalised embedding, the relaxed class similarity is a
softmax-weighted mean over the centers (entropy weight γ):

    S'_{i,c} = Σ_k softmax_k(x̂_iᵀw_c^k / γ) x̂_iᵀw_c^k

and the loss is a margin softmax over classes plus a regulariser that
merges redundant centers (as in the official implementation):

    L = 1/B Σ_i -log( exp(λ(S'_{i,y_i} - δ)) / (exp(λ(S'_{i,y_i} - δ)) + Σ_{c≠y_i} exp(λ S'_{i,c})) )
      + τ Σ_c Σ_{k<k'} sqrt(2 + 1e-5 - 2 w_c^kᵀw_c^k') / (C K (K - 1))

Defaults λ = 20, γ = 0.1, τ = 0.2, δ = 0.01, K = 10 (paper and official code
``idstcv/SoftTriple``). The ``1e-5`` keeps the square root differentiable when
two centers coincide.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from detreg_keras.losses import _pairs
from detreg_keras.losses.base import ProxyLoss


def soft_triple_loss(
    embeddings: tf.Tensor,
    labels: tf.Tensor,
    proxies: tf.Tensor,
    num_centers: int = 10,
    la: float = 20.0,
    gamma: float = 0.1,
    tau: float = 0.2,
    margin: float = 0.01,
) -> tf.Tensor:
    """SoftTriple loss of a batch (see the module docstring).

    Args:
        embeddings: ``[B, D]`` embeddings (normalised inside).
        labels: ``[B]`` integer labels in ``[0, C)``.
        proxies: ``[C * K, D]`` centers, class ``c``'s in rows ``c*K .. c*K + K - 1``
            (normalised inside).
        num_centers: ``K`` centers per class.
        la: λ, the softmax scale (20).
        gamma: γ, the entropy weight of the center assignment (0.1).
        tau: τ, the weight of the center-merging regulariser (0.2).
        margin: δ (0.01).

    Returns:
        Scalar loss.
    """
    labels = _pairs.flat_labels(labels)
    k = int(num_centers)
    centers = _pairs.l2_normalize(proxies)
    num_classes = tf.shape(centers)[0] // k
    sim = tf.matmul(_pairs.l2_normalize(embeddings), centers, transpose_b=True)  # [B, C*K]
    sim = tf.reshape(sim, [tf.shape(sim)[0], num_classes, k])
    weights = tf.nn.softmax(sim / gamma, axis=-1)
    class_sim = tf.reduce_sum(weights * sim, axis=-1)  # [B, C]
    margins = margin * tf.one_hot(labels, num_classes, dtype=class_sim.dtype)
    logits = la * (class_sim - margins)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
    if tau > 0 and k > 1:
        grouped = tf.reshape(centers, [num_classes, k, -1])
        gram = tf.matmul(grouped, grouped, transpose_b=True)  # [C, K, K]
        upper = tf.linalg.band_part(tf.ones([k, k]), 0, -1) - tf.eye(k)  # k < k'
        dist = tf.sqrt(tf.maximum(2.0 + 1e-5 - 2.0 * gram, 1e-12))
        reg = tf.reduce_sum(dist * upper) / tf.cast(num_classes * k * (k - 1), tf.float32)
        loss = loss + tau * reg
    return loss


@keras.saving.register_keras_serializable(package="detreg_keras")
class SoftTripleLoss(ProxyLoss):
    """Keras wrapper of :func:`soft_triple_loss` (registry name ``"soft_triple"``).

    Owns a ``[C * K, D]`` weight named ``proxies`` (the centers), initialised as
    the official ``kaiming_uniform_(a=sqrt(5))`` of a ``[D, C*K]`` matrix, i.e.
    ``U(-1/sqrt(C K), 1/sqrt(C K))``.

    Args:
        num_classes: number of training classes ``C``.
        embedding_dim: embedding dimension ``D``.
        num_centers: ``K`` (default 10).
        la: λ (default 20).
        gamma: γ (default 0.1).
        tau: τ (default 0.2).
        margin: δ (default 0.01).
        **kwargs: passed to :class:`DMLLoss`.
    """

    metric_name = "soft_triple_loss"
    loss_fn = staticmethod(soft_triple_loss)
    proxy_init = "uniform"

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        num_centers: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        tau: float = 0.2,
        margin: float = 0.01,
        **kwargs,
    ):
        if int(num_centers) < 1:
            raise ValueError(f"SoftTripleLoss needs num_centers >= 1, got {num_centers!r}.")
        hyper = {
            "num_centers": int(num_centers),
            "la": float(la),
            "gamma": float(gamma),
            "tau": float(tau),
            "margin": float(margin),
        }
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper=hyper, **kwargs)

    def num_proxies(self) -> int:
        return self.num_classes * self.num_centers
