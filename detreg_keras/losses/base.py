"""The interface every deep-metric-learning (DML) base loss implements, written once.

A base loss is a Keras layer so that proxy-based losses can own their proxies
as weights (saved with the model, trained by the optimizer). The math of each
loss lives in a pure function ``fn(embeddings, labels, *weights, **hyper)``;
the layer is a thin wrapper, as keras's ``LossFunctionWrapper``
(``keras/src/losses/losses.py``): the class names its pure function
(:attr:`DMLLoss.loss_fn`) and its constructor hands the hyper-parameters to
:class:`DMLLoss`, which keeps them as attributes, passes them to the function
and writes ``get_config`` -- once for every loss.

* :class:`DMLLoss`: pair-based losses (no weights).
* :class:`ProxyLoss`: losses that own a ``[P, D]`` weight named ``proxies``
  (``P = num_classes`` times the proxies per class); a subclass only says how the
  proxies are initialised.

``DRegModel`` creates one instance per flow head through
:func:`detreg_keras.losses.get` so that each head has its own proxies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import keras
import tensorflow as tf


def _config_value(value: Any) -> Any:
    """A JSON-friendly config value (tuples become lists, as Keras serialises them)."""
    return list(value) if isinstance(value, tuple) else value


@keras.saving.register_keras_serializable(package="detreg_keras")
class DMLLoss(keras.layers.Layer):
    """Base class of the DML losses: ``loss = layer(embeddings, labels)``.

    A subclass sets :attr:`loss_fn` (and, when the function takes layer
    weights, :attr:`weight_args`) and passes its hyper-parameters to
    ``super().__init__(..., hyper={...})``. Then :meth:`compute` calls
    ``loss_fn(embeddings, labels, *weights, **hyper)`` and :meth:`get_config`
    returns ``num_classes``, ``embedding_dim``, the hyper-parameters and the
    Keras layer arguments. A hyper-parameter named ``seed`` makes the layer own
    a ``keras.random.SeedGenerator(seed)`` whose next seed is what the function
    receives at each call (:meth:`uses_seed_generator` decides). Subclasses may
    still override :meth:`compute` and :meth:`get_config` instead.

    Embeddings are L2-normalised by the caller (``DRegModel``) but the pure
    functions normalise again where the paper's formula is a cosine, so they
    are safe to call on raw vectors.

    Args:
        num_classes: number of training classes (labels lie in ``[0, num_classes)``).
            Proxy-based losses need it; pair-based losses may leave it ``None``.
        embedding_dim: dimension ``D`` of the embeddings; proxy-based losses need it.
        hyper: the loss's hyper-parameters (constructor argument name -> value,
            already converted to their types).
        **kwargs: passed to ``keras.layers.Layer`` (``name``, ``dtype`` ...).

    Raises:
        ValueError: in :meth:`call`, for embeddings that are not ``[B, D]`` or
            labels whose count differs from ``B`` (when the shapes are known).
    """

    #: Name under which ``DRegModel`` logs this loss (``pa_loss`` for Proxy Anchor).
    metric_name: str = "dml_loss"
    #: True when the loss owns class proxies (they get the proxy learning rate).
    has_proxies: bool = False
    #: The pure loss function, ``fn(embeddings, labels, *weights, **hyper)`` (a ``staticmethod``).
    loss_fn: ClassVar[Callable[..., tf.Tensor] | None] = None
    #: Layer attributes passed positionally to :attr:`loss_fn` after the labels.
    weight_args: ClassVar[tuple[str, ...]] = ()
    #: Hyper-parameters that configure the layer (kept in the config) but are not arguments of :attr:`loss_fn`.
    layer_only: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        hyper: Mapping[str, Any] | None = None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.embedding_dim = None if embedding_dim is None else int(embedding_dim)
        self._hyper_names = tuple(hyper or ())
        for key, value in (hyper or {}).items():
            setattr(self, key, value)
        if "seed" in self._hyper_names:
            self.seed_generator = keras.random.SeedGenerator(self.seed) if self.uses_seed_generator() else None

    def uses_seed_generator(self) -> bool:
        """Whether the layer draws random numbers (then it owns a seed generator)."""
        return True

    def build(self, input_shape=None):
        self.built = True

    def call(self, embeddings, labels):
        embeddings = tf.cast(embeddings, tf.float32)
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        self._check_shapes(embeddings, labels)
        return self.compute(embeddings, labels)

    def _check_shapes(self, embeddings: tf.Tensor, labels: tf.Tensor) -> None:
        name = type(self).__name__
        if embeddings.shape.rank is not None and embeddings.shape.rank != 2:
            raise ValueError(f"{name} needs embeddings of shape [batch, dim], got shape {embeddings.shape}.")
        batch, count = embeddings.shape[0], labels.shape[0]
        if batch is not None and count is not None and batch != count:
            raise ValueError(
                f"{name} got {batch} embeddings but {count} labels; pass one integer label per embedding."
            )

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :attr:`loss_fn` for one call (draws the next seed)."""
        kwargs = {key: getattr(self, key) for key in self._hyper_names if key not in self.layer_only}
        if "seed" in kwargs:
            kwargs["seed"] = None if self.seed_generator is None else self.seed_generator.next()
        return kwargs

    def compute(self, embeddings: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """Return the scalar loss of a batch: :attr:`loss_fn` with the weights and hyper-parameters."""
        if self.loss_fn is None:
            raise NotImplementedError(f"{type(self).__name__} sets no loss_fn and does not override compute().")
        weights = [getattr(self, name) for name in self.weight_args]
        return self.loss_fn(embeddings, labels, *weights, **self.loss_kwargs())

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "embedding_dim": self.embedding_dim})
        config.update({key: _config_value(getattr(self, key)) for key in self._hyper_names})
        return config


def _check_size(value: Any, name: str, owner: str) -> int:
    if value is None or int(value) < 1:
        raise ValueError(f"{owner} needs {name} >= 1, got {value!r}.")
    return int(value)


@keras.saving.register_keras_serializable(package="detreg_keras")
class ProxyLoss(DMLLoss):
    """A :class:`DMLLoss` that owns a ``[num_proxies(), D]`` weight named ``proxies``.

    Subclasses set :attr:`proxy_init` / :attr:`proxy_stddev` or override :meth:`proxy_initializer`
    (and :meth:`num_proxies` for several proxies per class); the proxies are
    passed to :attr:`loss_fn` right after the labels.

    Args:
        num_classes: number of training classes ``C`` (required, ``>= 1``).
        embedding_dim: embedding dimension ``D`` (required, ``>= 1``).
        hyper: the loss's hyper-parameters, see :class:`DMLLoss`.
        **kwargs: passed to ``keras.layers.Layer``.

    Raises:
        ValueError: ``num_classes`` or ``embedding_dim`` missing or ``< 1``
            (the message names the loss class).
    """

    has_proxies = True
    weight_args = ("proxies",)
    #: ``"normal"``: ``N(0, proxy_stddev²)``; ``"uniform"``: ``U(±1/sqrt(P))``, the official
    #: ``kaiming_uniform_(a=sqrt(5))`` of a ``[D, P]`` matrix (SoftTriple, ProxyGML).
    proxy_init: ClassVar[str] = "normal"
    #: Standard deviation of the ``"normal"`` initializer.
    proxy_stddev: ClassVar[float] = 1.0

    def __init__(self, num_classes: int, embedding_dim: int, hyper: Mapping[str, Any] | None = None, **kwargs):
        owner = type(self).__name__
        num_classes = _check_size(num_classes, "num_classes", owner)
        embedding_dim = _check_size(embedding_dim, "embedding_dim", owner)
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, hyper=hyper, **kwargs)

    def num_proxies(self) -> int:
        """Rows of the proxy matrix: ``num_classes`` (SoftTriple and ProxyGML have several per class)."""
        return self.num_classes

    def proxy_initializer(self) -> keras.initializers.Initializer:
        """The initializer of the proxies, chosen by :attr:`proxy_init` (subclasses may override)."""
        if self.proxy_init == "uniform":
            bound = 1.0 / math.sqrt(self.num_proxies())
            return keras.initializers.RandomUniform(-bound, bound)
        return keras.initializers.RandomNormal(stddev=self.proxy_stddev)

    def build(self, input_shape=None):
        self.proxies = self.add_weight(
            name="proxies",
            shape=(self.num_proxies(), self.embedding_dim),
            initializer=self.proxy_initializer(),
            trainable=True,
        )
        self.built = True
