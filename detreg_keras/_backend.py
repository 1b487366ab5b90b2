"""Backend guard: detreg-keras runs Keras 3 on the TensorFlow backend only.

Importing :mod:`detreg_keras` sets ``KERAS_BACKEND=tensorflow`` when it is unset
and fails with a clear message when another backend has been forced, because the
flow heads are built from ``tensorflow_probability`` bijectors.
"""

from __future__ import annotations

import os

REQUIRED_BACKEND = "tensorflow"


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
