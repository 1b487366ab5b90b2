#!/usr/bin/env python
"""Train a DReg model and report retrieval metrics on held-out classes.

A thin wrapper of :mod:`detreg_keras.cli.train` (installed as ``detreg-train``);
``--help`` lists the options.
"""

import os
import sys

# No TensorFlow C++ log line unless the user sets the level (see detreg_keras._tf_logging).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from detreg_keras.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
