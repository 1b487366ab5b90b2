#!/usr/bin/env python
"""Build and query a faiss index with an exported ONNX model: ``detreg-index`` (:mod:`detreg_runtime.index_cli`).

    python scripts/detreg_index.py build --model model.onnx --images data/gallery --output gallery_index
    python scripts/detreg_index.py search --index gallery_index --model model.onnx query.jpg --k 5
"""

import sys

from detreg_runtime.index_cli import main

if __name__ == "__main__":
    sys.exit(main())
