"""Language guidance (Roth, Vinyals & Akata, CVPR 2022, "Integrating language guidance into vision-based DML").

A base DML loss is made to also match the batch's *visual* similarity
structure to the one that language embeddings of the class names give. For a
batch of ``B`` L2-normalised embeddings ``x̂_i`` with labels ``y_i`` and unit
class-name embeddings ``ê_c``:

    S^vis_ij  = x̂_iᵀ x̂_j,               S^lang_ij = ê_{y_i}ᵀ ê_{y_j} + s,
    same-class entries (the diagonal included) of both set to 1 + s,
    P_i = softmax(S^lang_i / T),        Q_i = softmax(S^vis_i / T),
    L_lang = T² / B · Σ_i KL(P_i ‖ Q_i)

(the paper's expert-language matching, "forward" distillation: the language
distribution is the fixed target, the visual one is trained). Filling the
same-class entries with the same constant leaves only the *ordering of the
other classes* to be matched: a class whose name is close to the anchor's
should come closer than one whose name is far. The layer returns
``base(x, y) + w · L_lang``. Defaults follow the authors' code: shift
``s = 1``, ``T = 1``, weight ``w = 7.5`` (their CUB-200 multi-similarity runs).

The class-name embeddings come from the user (see :mod:`detreg_keras.language`:
an array, a mapping, any callable, or the built-in hashed n-gram encoder);
nothing is downloaded. The paper's *pseudo-label* variant (ImageNet top-k class
names of each image as text) is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from detreg_keras.language import class_name_embeddings
from detreg_keras.losses import _pairs
from detreg_keras.losses.base import DMLLoss

__all__ = ["LanguageGuidedLoss", "language_guidance_loss"]


def language_guidance_loss(
    embeddings: tf.Tensor,
    labels: tf.Tensor,
    class_embeddings: tf.Tensor,
    shift: float = 1.0,
    temperature: float = 1.0,
) -> tf.Tensor:
    """``L_lang`` of a batch (see the module docstring).

    Args:
        embeddings: ``[B, D]`` embeddings (normalised inside).
        labels: ``[B]`` integer labels in ``[0, C)``.
        class_embeddings: ``[C, E]`` class-name embeddings (normalised inside).
        shift: ``s``, added to the language similarities.
        temperature: ``T`` of both softmaxes.

    Returns:
        Scalar ``T²/B Σ_i KL(P_i ‖ Q_i)`` (0 for a batch of one class).
    """
    labels = _pairs.flat_labels(labels)
    visual = _pairs.cosine_similarity_matrix(embeddings)
    words = tf.gather(_pairs.l2_normalize(tf.cast(class_embeddings, visual.dtype)), labels)
    language = tf.matmul(words, words, transpose_b=True) + shift
    same = _pairs.same_label_matrix(labels)
    fill = tf.fill(tf.shape(visual), tf.cast(1.0 + shift, visual.dtype))
    log_p = tf.nn.log_softmax(tf.where(same, fill, language) / temperature, axis=1)
    log_q = tf.nn.log_softmax(tf.where(same, fill, visual) / temperature, axis=1)
    kl = tf.reduce_sum(tf.exp(log_p) * (log_p - log_q))
    return kl * temperature**2 / tf.cast(tf.shape(visual)[0], visual.dtype)


@keras.saving.register_keras_serializable(package="detreg_keras")
class LanguageGuidedLoss(DMLLoss):
    """A base loss plus ``weight · L_lang`` (registry name ``"language_guidance"``).

    Args:
        num_classes: number of training classes ``C`` (the table's rows; required).
        embedding_dim: passed to the base loss (proxy losses need it).
        loss: registry name of the base loss (default multi-similarity, the paper's main one).
        loss_config: the base loss's hyper-parameters.
        class_embeddings: a ``[C, E]`` array, a mapping ``name -> vector``, a
            callable ``f(names) -> [C, E]`` or a built-in encoder name (default
            ``"hashed_ngram"``); all but an array need ``class_names``.
        class_names: the training class names in label order.
        weight: ``w`` of ``L_lang`` (>= 0).
        shift: ``s``.
        temperature: ``T`` (> 0).
        **kwargs: passed to :class:`DMLLoss` (``name`` ...).

    Raises:
        ValueError: no class embeddings and no class names, a class without a
            text embedding, a table whose rows are not ``num_classes``, ``weight < 0``,
            ``temperature <= 0``, a base loss that is itself ``"language_guidance"``.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        loss: str = "multi_similarity",
        loss_config: dict[str, Any] | None = None,
        class_embeddings: Any = "hashed_ngram",
        class_names: Sequence[str] | None = None,
        weight: float = 7.5,
        shift: float = 1.0,
        temperature: float = 1.0,
        **kwargs,
    ):
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, **kwargs)
        if self.num_classes is None or self.num_classes < 1:
            raise ValueError(f"LanguageGuidedLoss needs num_classes >= 1, got {num_classes!r}.")
        if float(weight) < 0 or not float(temperature) > 0:
            raise ValueError(f"LanguageGuidedLoss needs weight >= 0 and temperature > 0, got {weight!r}, {temperature!r}.")
        if isinstance(class_embeddings, str) and class_names is None:
            raise ValueError(
                "LanguageGuidedLoss needs the training class names in label order (class_names) for the "
                f"{class_embeddings!r} encoder, or a [num_classes, dim] array as class_embeddings."
            )
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        self.table = class_name_embeddings(class_embeddings, self.class_names, self.num_classes)
        self.encoder = class_embeddings if isinstance(class_embeddings, str) else None
        self.weight, self.shift, self.temperature = float(weight), float(shift), float(temperature)
        self.base_name = str(loss).lower().replace("-", "_")
        if self.base_name == "language_guidance":
            raise ValueError("LanguageGuidedLoss cannot wrap itself; give the base loss (e.g. 'proxy_anchor').")
        self.loss_config = dict(loss_config or {})
        from detreg_keras.losses import get  # noqa: PLC0415 (the registry imports this module)

        self.base_loss = get(
            self.base_name, num_classes=num_classes, embedding_dim=embedding_dim, name=f"{self.name}_base", **self.loss_config
        )
        self.metric_name = self.base_loss.metric_name  # logs keep the base loss's name
        self.has_proxies = self.base_loss.has_proxies

    def build(self, input_shape=None):
        if not self.base_loss.built:
            self.base_loss.build(input_shape)
        self.built = True

    def call(self, embeddings, labels, training=None):
        embeddings = tf.cast(embeddings, tf.float32)
        labels = _pairs.flat_labels(labels)
        self._check_shapes(embeddings, labels)
        base = self.base_loss(embeddings, labels, training=training)
        return base + self.weight * self.compute(embeddings, labels)

    def compute(self, embeddings: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """``L_lang`` of the batch alone (without the base loss or the weight)."""
        return language_guidance_loss(
            embeddings, labels, tf.constant(self.table), shift=self.shift, temperature=self.temperature
        )

    def get_config(self) -> dict:
        config = super().get_config()
        table = self.encoder if self.encoder is not None else np.asarray(self.table, np.float64).tolist()
        config.update(
            {
                "loss": self.base_name,
                "loss_config": self.loss_config,
                "class_embeddings": table,
                "class_names": self.class_names,
                "weight": self.weight,
                "shift": self.shift,
                "temperature": self.temperature,
            }
        )
        return config
