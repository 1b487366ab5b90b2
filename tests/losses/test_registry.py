"""Every registered loss: built by ``get``, config round trip, Keras serialisation, tf.function, finite gradients."""

from __future__ import annotations

import inspect
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from detreg_keras import losses
from detreg_keras.losses.base import DMLLoss

from ._helpers import BATCHES, assert_all_finite

NUM_CLASSES = 7  # the hand-made batches use labels up to 6
REQUIRED = (
    "proxy_anchor",
    "contrastive",
    "triplet",
    "npair",
    "lifted_structure",
    "multi_similarity",
    "circle",
    "proxy_nca",
    "proxy_nca_pp",
    "soft_triple",
    "normalized_softmax",
    "cosface",
    "arcface",
    "recall_at_k",
    "margin",
    "proxy_gml",
    "triplet_dr",
    "language_guidance",
)
#: Arguments a loss cannot do without (language guidance embeds the class names).
REQUIRED_ARGS = {"language_guidance": {"class_names": [f"class {c}" for c in range(NUM_CLASSES)]}}
PROXY_LOSSES = {
    "proxy_anchor",
    "proxy_nca",
    "proxy_nca_pp",
    "soft_triple",
    "proxy_gml",
    "normalized_softmax",
    "cosface",
    "arcface",
}
#: Trainable weights of the losses that own some but no proxies.
OTHER_WEIGHTS = {"margin": ["beta"]}
#: Losses that draw random numbers at each call (an eager call draws other ones than the traced one).
RANDOM_LOSSES = {"rho_triplet", "margin"}
#: Non-default hyper-parameters (so the round trip is not satisfied by the defaults); seeds fix random losses.
NON_DEFAULT = {
    "contrastive": {"neg_margin": 0.8},
    "triplet": {"mining": "semihard", "margin": 0.3},
    "rho_triplet": {"rho": 0.5, "seed": 3},
    "npair": {"scale": 2.0},
    "lifted_structure": {"margin": 0.5},
    "multi_similarity": {"epsilon": 0.2},
    "circle": {"gamma": 64.0},
    "recall_at_k": {"simix": True, "seed": 4, "chunk_size": 3, "k_values": (1, 2)},
    "margin": {"beta_mode": "global", "nu": 0.01, "seed": 5, "weight_cap": 30.0},
    "triplet_dr": {"gamma": 0.4, "mining": "hard"},
    "proxy_gml": {"proxies_per_class": 2, "r": 0.3},
    "proxy_nca": {"scale": 3.0},
    "proxy_nca_pp": {"temperature": 0.2},
    "soft_triple": {"num_centers": 3},
    "normalized_softmax": {"temperature": 0.1},
    "cosface": {"margin": 0.2},
    "arcface": {"margin": 0.3},
    "proxy_anchor": {"alpha": 16.0},
    "language_guidance": {"weight": 2.0, "temperature": 0.5, "loss": "triplet"},
}


def test_required_names_are_registered():
    assert set(REQUIRED) <= set(losses.LOSSES)
    with pytest.raises(ValueError, match="Known losses"):
        losses.get("no_such_loss")


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_get_builds_and_flags_proxies(name):
    layer = losses.get(name, num_classes=NUM_CLASSES, embedding_dim=6, **REQUIRED_ARGS.get(name, {}))
    assert isinstance(layer, DMLLoss)
    assert layer.metric_name != DMLLoss.metric_name
    assert layer.has_proxies == (name in PROXY_LOSSES)
    value = layer(*BATCHES["mixed"])
    assert value.shape == () and np.isfinite(float(value))
    names = [w.path.split("/")[-1] for w in layer.trainable_weights]
    assert names == (["proxies"] if name in PROXY_LOSSES else OTHER_WEIGHTS.get(name, []))


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_config_round_trip_same_value_with_same_weights(name):
    layer = losses.get(name, num_classes=NUM_CLASSES, embedding_dim=6, **REQUIRED_ARGS.get(name, {}), **NON_DEFAULT.get(name, {}))
    config = layer.get_config()
    params = [
        p
        for p, spec in inspect.signature(type(layer).__init__).parameters.items()
        if p != "self" and spec.kind not in (spec.VAR_KEYWORD, spec.VAR_POSITIONAL)
    ]
    assert set(params) <= set(config), f"get_config misses {set(params) - set(config)}"
    clone = type(layer).from_config(config)
    layer.build(None)
    clone.build(None)
    clone.set_weights(layer.get_weights())
    x, y = BATCHES["mixed"]
    np.testing.assert_allclose(float(clone(x, y)), float(layer(x, y)), rtol=1e-6)
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"].startswith("detreg_keras>")
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is type(layer) and restored.get_config() == config


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_tf_function_dynamic_batch_matches_eager(name):
    layer = losses.get(name, num_classes=NUM_CLASSES, embedding_dim=6, **REQUIRED_ARGS.get(name, {}))
    layer.build(None)
    x_a, y_a = BATCHES["mixed"]
    x_b = np.random.default_rng(5).normal(size=(6, 6)).astype(np.float32)
    y_b = np.array([6, 6, 1, 1, 1, 0], np.int32)

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32), tf.TensorSpec([None], tf.int32)])
    def step(embeddings, labels):
        with tf.GradientTape() as tape:
            tape.watch(embeddings)
            loss = layer(embeddings, labels)
        return loss, tape.gradient(loss, [embeddings] + layer.trainable_weights)

    for x, y in ((x_a, y_a), (x_b, y_b)):
        loss, grads = step(tf.constant(x), tf.constant(y))
        assert_all_finite(float(loss), [g.numpy() for g in grads])
        if name not in RANDOM_LOSSES:  # random draws: the eager call would draw other ones
            np.testing.assert_allclose(float(loss), float(layer(x, y)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_degenerate_batches_have_finite_value_and_gradients(name, batch):
    x, y = BATCHES[batch]
    kwargs = {"simix": True, "seed": 0} if name == "recall_at_k" else {}
    layer = losses.get(name, num_classes=NUM_CLASSES, embedding_dim=x.shape[1], **REQUIRED_ARGS.get(name, {}), **kwargs)
    variable = tf.Variable(x)
    with tf.GradientTape() as tape:
        loss = layer(variable, y)
    grads = tape.gradient(loss, [variable] + layer.trainable_weights)
    assert_all_finite(float(loss), [np.zeros(1) if g is None else g.numpy() for g in grads])
    if batch == "singletons" and name not in PROXY_LOSSES | {"contrastive", "language_guidance"}:
        assert float(loss) == 0.0  # no positive pair: the pair-based losses contribute nothing
    if batch == "one_class" and name not in PROXY_LOSSES | {"contrastive", "npair", "recall_at_k"}:
        assert float(loss) == 0.0  # no negative pair (contrastive keeps its positive term,
        # N-pair and RS@k their single-class value)


# --------------------------------------------------------------------------- #
# The contract every registered loss class keeps (keras ``run_layer_test`` style)
# --------------------------------------------------------------------------- #
#: Keys keras.layers.Layer itself puts into a config.
LAYER_KEYS = set(keras.layers.Layer(dtype="float32").get_config())


def _constructor_params(cls) -> set[str]:
    return {
        p
        for p, spec in inspect.signature(cls.__init__).parameters.items()
        if p != "self" and spec.kind not in (spec.VAR_KEYWORD, spec.VAR_POSITIONAL)
    }


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_config_is_exactly_the_constructor_arguments(name):
    overrides = NON_DEFAULT.get(name, {})
    layer = losses.get(name, num_classes=NUM_CLASSES, embedding_dim=6, **REQUIRED_ARGS.get(name, {}), **overrides)
    config = layer.get_config()
    assert set(config) - LAYER_KEYS == _constructor_params(type(layer))
    for key, value in overrides.items():  # the values given, not the defaults
        assert config[key] == (list(value) if isinstance(value, tuple) else value), key
    assert json.loads(json.dumps(config)) == config  # plain JSON: what model.keras stores
    assert type(layer).from_config(config).get_config() == config


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_bad_batches_raise_errors_naming_the_loss(name):
    layer = losses.get(name, num_classes=NUM_CLASSES, embedding_dim=6, **REQUIRED_ARGS.get(name, {}))
    owner = type(layer).__name__
    x, y = BATCHES["mixed"]
    with pytest.raises(ValueError, match=rf"{owner} got 10 embeddings but 9 labels"):
        layer(x, y[:9])
    with pytest.raises(ValueError, match=rf"{owner} needs embeddings of shape \[batch, dim\]"):
        layer(x[None], y)


@pytest.mark.parametrize("name", sorted(PROXY_LOSSES))
@pytest.mark.parametrize("bad", [{"num_classes": None}, {"num_classes": 0}, {"embedding_dim": None}])
def test_proxy_losses_need_their_sizes(name, bad):
    kwargs = {"num_classes": NUM_CLASSES, "embedding_dim": 6, **bad}
    key, value = next(iter(bad.items()))
    owner = losses.LOSSES[name].__name__
    with pytest.raises(ValueError, match=rf"{owner} needs {key} >= 1, got {value!r}"):
        losses.get(name, **kwargs)


def test_the_wrapper_alone_gives_config_compute_and_serialisation():
    """A new loss written on DMLLoss: a pure function, its hyper-parameters, nothing else."""

    def scaled_norm_loss(embeddings, labels, scale=1.0, offset=(0.0,)):
        return scale * tf.reduce_mean(tf.norm(embeddings, axis=1)) + offset[0] + 0.0 * tf.cast(labels[0], tf.float32)

    class ScaledNorm(DMLLoss):
        loss_fn = staticmethod(scaled_norm_loss)

        def __init__(self, num_classes=None, embedding_dim=None, scale=1.0, offset=(0.0,), **kwargs):
            super().__init__(num_classes, embedding_dim, hyper={"scale": float(scale), "offset": tuple(offset)}, **kwargs)

    layer = ScaledNorm(scale=3.0, offset=(0.5,), name="sn")
    x, y = BATCHES["mixed"]
    expected = 3.0 * np.mean(np.linalg.norm(x.astype(np.float64), axis=1)) + 0.5
    assert float(layer(x, y)) == pytest.approx(expected, rel=1e-6)
    assert layer.scale == 3.0 and layer.offset == (0.5,)
    config = layer.get_config()
    assert {k: config[k] for k in ("num_classes", "embedding_dim", "scale", "offset", "name")} == {
        "num_classes": None, "embedding_dim": None, "scale": 3.0, "offset": [0.5], "name": "sn"
    }  # fmt: skip
    assert float(ScaledNorm.from_config(config)(x, y)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(NotImplementedError, match="sets no loss_fn"):
        DMLLoss()(x, y)


#: Proxy initialisation of each official implementation, for C = 7 classes:
#: (distribution, parameter, rows of the proxy matrix).
PROXY_INIT = {
    "proxy_anchor": ("RandomNormal", np.sqrt(2.0 / 7), 7),  # kaiming_normal_(mode="fan_out")
    "proxy_nca": ("RandomNormal", 1.0, 7),  # PML: torch.randn
    "proxy_nca_pp": ("RandomNormal", 1.0 / 8.0, 7),  # official: randn / 8
    "normalized_softmax": ("RandomNormal", 1.0, 7),
    "cosface": ("RandomNormal", 1.0, 7),
    "arcface": ("RandomNormal", 1.0, 7),
    "soft_triple": ("RandomUniform", 1.0 / np.sqrt(7 * 10), 70),  # kaiming_uniform_(a=sqrt(5)), K = 10
    "proxy_gml": ("RandomUniform", 1.0 / np.sqrt(7 * 12), 84),  # N = 12 proxies per class
}


@pytest.mark.parametrize("name", sorted(PROXY_LOSSES))
def test_proxies_are_initialised_as_the_official_code(name):
    layer = losses.get(name, num_classes=NUM_CLASSES, embedding_dim=6, **REQUIRED_ARGS.get(name, {}))
    kind, scale, rows = PROXY_INIT[name]
    init = layer.proxy_initializer()
    assert type(init).__name__ == kind
    config = init.get_config()
    assert (config["stddev"] if kind == "RandomNormal" else config["maxval"]) == pytest.approx(scale)
    if kind == "RandomUniform":
        assert config["minval"] == pytest.approx(-scale)
    layer.build(None)
    assert tuple(layer.proxies.shape) == (rows, 6)
