"""Shared test fixtures: quiet TensorFlow, deterministic seeds, repo paths."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # what `import detreg_keras` first gives users

import keras
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT_DIR = REPO_ROOT.parent / "shared" / "data" / "omniglot"


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield


def load_script(name: str, folder: str = "scripts"):
    """Import ``REPO_ROOT/folder/name.py`` (scripts are not a package) as module ``_script_name``."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO_ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
