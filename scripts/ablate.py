#!/usr/bin/env python
"""Run ablation studies (a grid of variants × seeds) and write tables and a plot.

A thin wrapper of :mod:`detreg_keras.cli.ablate` (installed as ``detreg-ablate``);
``--help`` lists the options.
"""

import os
import sys

# No TensorFlow C++ log line unless the user sets the level (see detreg_keras._tf_logging).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from detreg_keras.cli.ablate import main

if __name__ == "__main__":
    sys.exit(main())
