#!/usr/bin/env python
"""Omniglot benchmark: plain Proxy Anchor vs DReg, same backbone, budget and seeds.

A thin wrapper of :mod:`detreg_keras.cli.omniglot_benchmark` (installed as ``detreg-omniglot-benchmark``);
``--help`` lists the options.
"""

import os
import sys

# No TensorFlow C++ log line unless the user sets the level (see detreg_keras._tf_logging).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from detreg_keras.cli.omniglot_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
