"""Backbones: Keras Applications CNNs (raw pixels in, feature map out) and a small CNN.

Every backbone returned by :func:`build_backbone` takes float RAW pixels in
``[0, 255]`` (NHWC) and does its own preprocessing inside the graph (so exported
ONNX / SavedModel graphs take raw pixels), and returns a feature map
``[B, h, w, C]``; pooling and the embedding layer live in
:class:`detreg_keras.model.EmbeddingHead`.

BatchNormalization layers are frozen by default (paper Sec. 5.2): Keras 3 runs a
``BatchNormalization`` with ``trainable=False`` in inference mode, with its
moving statistics and affine parameters fixed.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

_PACKAGE = "detreg_keras"

# name -> (constructor, preprocessing mode, minimum image size)
_APPLICATIONS: dict[str, tuple[Callable[..., keras.Model], str, int]] = {
    "resnet50": (keras.applications.ResNet50, "caffe", 32),
    "resnet101": (keras.applications.ResNet101, "caffe", 32),
    "resnet50v2": (keras.applications.ResNet50V2, "tf", 32),
    "inception_v3": (keras.applications.InceptionV3, "tf", 75),
    "inception_resnet_v2": (keras.applications.InceptionResNetV2, "tf", 75),
    "mobilenet_v2": (keras.applications.MobileNetV2, "tf", 32),
    "densenet121": (keras.applications.DenseNet121, "torch", 32),
    "efficientnet_b0": (keras.applications.EfficientNetB0, "none", 32),
    "efficientnet_b1": (keras.applications.EfficientNetB1, "none", 32),
    "efficientnet_b2": (keras.applications.EfficientNetB2, "none", 32),
    "efficientnet_b3": (keras.applications.EfficientNetB3, "none", 32),
    "efficientnet_v2_s": (keras.applications.EfficientNetV2S, "none", 32),
    "convnext_tiny": (keras.applications.ConvNeXtTiny, "none", 32),
}

BACKBONES = tuple(sorted(_APPLICATIONS)) + ("small_cnn",)

_IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ImagePreprocessing(keras.layers.Layer):
    """In-graph version of ``keras.applications.imagenet_utils.preprocess_input``.

    Modes (input: RGB raw pixels in ``[0, 255]``):
        ``"caffe"``: RGB→BGR then subtract the ImageNet mean (ResNet).
        ``"tf"``: scale to ``[-1, 1]`` (Inception, MobileNet).
        ``"torch"``: scale to ``[0, 1]`` then ImageNet mean/std (DenseNet).
        ``"scale"``: scale to ``[0, 1]``.
        ``"none"``: identity (EfficientNet / ConvNeXt normalise internally).
    """

    MODES = ("caffe", "tf", "torch", "scale", "none")

    def __init__(self, mode: str = "scale", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"Unknown preprocessing mode {mode!r}; expected one of {self.MODES}.")
        self.mode = mode

    def call(self, x):
        x = keras.ops.cast(x, self.compute_dtype)
        if self.mode == "caffe":
            x = x[..., ::-1] - keras.ops.convert_to_tensor(np.array(_IMAGENET_MEAN_RGB[::-1]), self.compute_dtype)
        elif self.mode == "tf":
            x = x / 127.5 - 1.0
        elif self.mode == "torch":
            mean = keras.ops.convert_to_tensor(np.array(_TORCH_MEAN), self.compute_dtype)
            std = keras.ops.convert_to_tensor(np.array(_TORCH_STD), self.compute_dtype)
            x = (x / 255.0 - mean) / std
        elif self.mode == "scale":
            x = x / 255.0
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config["mode"] = self.mode
        return config


def freeze_batchnorm(model: keras.Model) -> int:
    """Set every ``BatchNormalization`` layer of ``model`` to ``trainable=False``.

    Returns:
        The number of layers frozen.
    """
    count = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
            count += 1
    return count


#: Moving-average momentum of the small CNN's BatchNorm layers: PyTorch's default
#: (its ``momentum=0.1`` is Keras' ``0.9``). Keras' own default, 0.99, leaves the
#: moving statistics of a network trained from scratch far behind the weights for
#: the first few hundred steps: a 4-epoch Omniglot run (172 steps) evaluated at
#: R@1 20.7% with the moving statistics (its untrained level) and 57.1% with
#: batch statistics.
SMALL_CNN_BN_MOMENTUM = 0.9


def _small_cnn(image_size: int, channels: int, widths: tuple[int, ...], name: str) -> keras.Model:
    inputs = keras.Input((image_size, image_size, channels), name="images")
    x = ImagePreprocessing("scale", name="preprocess")(inputs)
    size = image_size
    for i, width in enumerate(widths):
        x = keras.layers.Conv2D(width, 3, padding="same", name=f"conv{i}_a")(x)
        x = keras.layers.BatchNormalization(momentum=SMALL_CNN_BN_MOMENTUM, name=f"bn{i}_a")(x)
        x = keras.layers.Activation("relu", name=f"relu{i}_a")(x)
        x = keras.layers.Conv2D(width, 3, padding="same", name=f"conv{i}_b")(x)
        x = keras.layers.BatchNormalization(momentum=SMALL_CNN_BN_MOMENTUM, name=f"bn{i}_b")(x)
        x = keras.layers.Activation("relu", name=f"relu{i}_b")(x)
        if size >= 4 and i < len(widths) - 1:
            x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
            size //= 2
    return keras.Model(inputs, x, name=name)


def build_backbone(
    name: str = "resnet50",
    image_size: int = 224,
    weights: str | None = "imagenet",
    channels: int = 3,
    freeze_bn: bool | None = None,
    small_cnn_widths: tuple[int, ...] = (32, 64, 128),
) -> keras.Model:
    """Build a backbone that maps raw pixels ``[B, S, S, C]`` to a feature map.

    Args:
        name: one of :data:`BACKBONES` (Keras Applications names in snake case, or
            ``"small_cnn"`` for small images trained from scratch on a CPU).
        image_size: input side ``S``.
        weights: ``"imagenet"`` (default), ``None`` (random init) or a path to a
            weights file. Ignored by ``small_cnn``.
        channels: input channels; Keras Applications need 3.
        freeze_bn: freeze BatchNormalization (paper Sec. 5.2). Default: True for
            Keras Applications, False for ``small_cnn`` (trained from scratch, its
            BN statistics must be learned).
        small_cnn_widths: conv widths of the small CNN blocks.

    Returns:
        A functional ``keras.Model`` named ``backbone``.

    Raises:
        ValueError: unknown name, wrong channels or too small an image.
        RuntimeError: ImageNet weights could not be downloaded (offline); the
            message suggests ``weights=None``.
    """
    key = name.lower().replace("-", "_")
    if key == "small_cnn":
        model = _small_cnn(int(image_size), int(channels), tuple(small_cnn_widths), name="backbone")
        if freeze_bn:
            freeze_batchnorm(model)
        return model
    if key not in _APPLICATIONS:
        raise ValueError(f"Unknown backbone {name!r}; expected one of {BACKBONES}.")
    constructor, mode, min_size = _APPLICATIONS[key]
    if channels != 3:
        raise ValueError(
            f"Backbone {name!r} takes RGB images (channels=3), got channels={channels}; "
            "convert grayscale/RGBA images to RGB in the data pipeline."
        )
    if image_size < min_size:
        raise ValueError(f"Backbone {name!r} needs image_size >= {min_size}, got {image_size}.")
    inputs = keras.Input((image_size, image_size, 3), name="images")
    try:
        app = constructor(include_top=False, weights=weights, input_shape=(image_size, image_size, 3))
    except Exception as err:  # download failures surface as many exception types
        if weights == "imagenet":
            raise RuntimeError(
                f"Could not load ImageNet weights for backbone {name!r} ({type(err).__name__}: {err}). "
                "This machine may be offline: Keras downloads them to ~/.keras/models on first use. "
                "Copy the weight file there, pass a local path as `weights=`, or use `weights=None` "
                "to start from random initialisation."
            ) from err
        raise
    x = ImagePreprocessing(mode, name="preprocess")(inputs)
    features = app(x)
    model = keras.Model(inputs, features, name="backbone")
    if freeze_bn is None or freeze_bn:
        freeze_batchnorm(model)
    return model
