"""Backend guard: detreg-keras runs Keras 3 on the TensorFlow backend only.

Importing :mod:`detreg_keras` sets ``KERAS_BACKEND=tensorflow`` when it is unset
and fails with a clear message when another backend has been forced, because the
flow heads are built from ``tensorflow_probability`` bijectors.

It also turns on TensorFlow's oneDNN CPU kernels (``TF_ENABLE_ONEDNN_OPTS=1``)
when TensorFlow has not been imported yet and the variable is unset. Whether that
changes anything depends on the CPU (:mod:`detreg_keras.cpu`): TF's Linux x86
build already turns oneDNN on by default on CPUs with AVX512_VNNI, AVX512_BF16,
AVX_VNNI or AMX (e.g. AMD Zen 4/5, Intel Ice Lake and later) and leaves it off on
the others (e.g. AMD Zen 3, Intel Skylake-X), where it made ResNet50@224 train
steps 1.33x and small-CNN steps 1.24x faster (Zen 3, BENCHMARKS.md). The package
never overrides a ``TF_ENABLE_ONEDNN_OPTS`` the user set, and never touches it
once TensorFlow is imported (then TF's own default stays, whatever it is on that
CPU). Set ``TF_ENABLE_ONEDNN_OPTS=0`` to keep TensorFlow's Eigen kernels.
"""

from __future__ import annotations

import os
import sys

REQUIRED_BACKEND = "tensorflow"


def prefer_onednn() -> bool:
    """Sets ``TF_ENABLE_ONEDNN_OPTS=1`` if it is unset and TensorFlow is not imported yet.

    Returns:
        Whether the variable was set here (it only takes effect before
        TensorFlow's first import).
    """
    if "TF_ENABLE_ONEDNN_OPTS" in os.environ or "tensorflow" in sys.modules:
        return False
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"
    return True


def onednn_enabled() -> bool:
    """Whether the loaded TensorFlow runs its oneDNN CPU kernels."""
    from tensorflow.python.util import _pywrap_util_port  # noqa: PLC0415

    return bool(_pywrap_util_port.IsMklEnabled())


def ensure_tensorflow_backend() -> None:
    """Select the TensorFlow backend, or raise if Keras already uses another.

    Raises:
        RuntimeError: if ``KERAS_BACKEND`` names another backend, or if Keras was
            imported earlier with another backend.
    """
    requested = os.environ.get("KERAS_BACKEND")
    if requested is None:
        os.environ["KERAS_BACKEND"] = REQUIRED_BACKEND
    elif requested != REQUIRED_BACKEND:
        raise RuntimeError(
            f"detreg_keras needs the Keras 'tensorflow' backend, but KERAS_BACKEND="
            f"{requested!r}. Unset KERAS_BACKEND or set KERAS_BACKEND=tensorflow "
            "before importing keras or detreg_keras."
        )
    import keras  # noqa: PLC0415  (imported after the environment is set)

    if keras.backend.backend() != REQUIRED_BACKEND:
        raise RuntimeError(
            f"detreg_keras needs the Keras 'tensorflow' backend, but Keras is running "
            f"on {keras.backend.backend()!r} (set in ~/.keras/keras.json or by an "
            "earlier import). Set KERAS_BACKEND=tensorflow before importing keras."
        )
