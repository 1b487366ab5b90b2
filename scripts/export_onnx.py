#!/usr/bin/env python
"""Export a trained DReg model to ONNX: ``detreg-export-onnx`` (:mod:`detreg_keras.deploy_cli`).

Run ``python scripts/export_onnx.py --help`` for the options.
"""

import sys

from detreg_keras.deploy_cli import export_onnx_main as main

if __name__ == "__main__":
    sys.exit(main())
