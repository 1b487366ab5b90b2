#!/usr/bin/env python
"""Evaluate a saved DReg model: retrieval metrics on a dataset's test classes.

A thin wrapper of :mod:`detreg_keras.cli.evaluate` (installed as ``detreg-evaluate``);
``--help`` lists the options.
"""

import os
import sys

# No TensorFlow C++ log line unless the user sets the level (see detreg_keras._tf_logging).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from detreg_keras.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
