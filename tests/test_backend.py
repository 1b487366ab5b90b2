"""Import-time environment of the package (detreg_keras._backend), checked in fresh interpreters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from detreg_keras import _backend

_PROBE = """
import json, os, sys
{before}
import detreg_keras
print(json.dumps({{"env": os.environ.get("TF_ENABLE_ONEDNN_OPTS"), "onednn": detreg_keras._backend.onednn_enabled(),
                  "backend": __import__("keras").backend.backend()}}))
"""


def _probe(before: str = "", **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "KERAS_BACKEND")}
    clean.update(env, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(before=before)], env=clean, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_turns_on_onednn_and_selects_tensorflow():
    assert _probe() == {"env": "1", "onednn": True, "backend": "tensorflow"}


def test_user_choice_and_earlier_tensorflow_import_are_respected():
    assert _probe(TF_ENABLE_ONEDNN_OPTS="0") == {"env": "0", "onednn": False, "backend": "tensorflow"}
    # TensorFlow imported first: too late to change its kernels, so nothing is set
    assert _probe(before="import tensorflow") == {"env": None, "onednn": False, "backend": "tensorflow"}


def test_prefer_onednn_is_a_no_op_once_tensorflow_is_loaded(monkeypatch):
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    assert "tensorflow" in sys.modules
    assert _backend.prefer_onednn() is False and "TF_ENABLE_ONEDNN_OPTS" not in os.environ


def test_another_keras_backend_is_refused():
    clean = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    out = subprocess.run(
        [sys.executable, "-c", "import detreg_keras"],
        env={**clean, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode != 0 and "needs the Keras 'tensorflow' backend" in out.stderr
