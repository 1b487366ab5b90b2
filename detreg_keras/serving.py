"""Moved to :mod:`detreg_runtime.service` (TensorFlow-free); this alias is kept for one release.

``python -m detreg_keras.serving ...`` still starts the service, but importing
``detreg_keras`` first loads TensorFlow (seconds, hundreds of MB); start it with
``detreg-serve`` or ``python -m detreg_runtime`` instead (same options).
"""

import sys

from detreg_runtime.service import (
    DEFAULT_MAX_IMAGES,
    DEFAULT_MAX_INFLIGHT,
    DEFAULT_MAX_K,
    DEFAULT_MAX_REQUEST_BYTES,
    MAX_PIXELS_CEILING,
    MIN_DEFAULT_PIXELS,
    AdmissionMiddleware,
    BodySizeLimitMiddleware,
    PixelBudget,
    ServerThread,
    ServiceBusy,
    ServiceLimits,
    create_app,
    default_max_pixels,
    main,
    parse_k,
    parse_threshold,
)

__all__ = [
    "DEFAULT_MAX_IMAGES",
    "DEFAULT_MAX_INFLIGHT",
    "DEFAULT_MAX_K",
    "DEFAULT_MAX_REQUEST_BYTES",
    "MAX_PIXELS_CEILING",
    "MIN_DEFAULT_PIXELS",
    "AdmissionMiddleware",
    "BodySizeLimitMiddleware",
    "PixelBudget",
    "ServerThread",
    "ServiceBusy",
    "ServiceLimits",
    "create_app",
    "default_max_pixels",
    "main",
    "parse_k",
    "parse_threshold",
]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
