"""Moved to :mod:`detreg_runtime.verification` (TensorFlow-free); this alias is kept for one release.

``detreg_keras.verification`` *is* that module (same object), so every name,
private ones included, keeps working.
"""

import sys

from detreg_runtime import verification as _verification

sys.modules[__name__] = _verification
