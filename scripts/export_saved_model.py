#!/usr/bin/env python
"""Export a DReg model as a TF Serving SavedModel: ``detreg-export-saved-model`` (:mod:`detreg_keras.deploy_cli`).

Run ``python scripts/export_saved_model.py --help`` for the options.
"""

import sys

from detreg_keras.deploy_cli import export_saved_model_main as main

if __name__ == "__main__":
    sys.exit(main())
