"""Import-time environment of the package (detreg_keras._backend), checked in fresh interpreters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from detreg_keras import _backend, cpu

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


@pytest.fixture(scope="module")
def tensorflow_default() -> bool:
    """TensorFlow's own oneDNN choice on this CPU (on with AVX512_VNNI/BF16, AVX_VNNI or AMX, off otherwise)."""
    return cpu.measure_tensorflow_onednn_default()


def test_import_turns_on_onednn_and_selects_tensorflow():
    assert _probe() == {"env": "1", "onednn": True, "backend": "tensorflow"}


def test_user_choice_is_respected_on_any_cpu():
    assert _probe(TF_ENABLE_ONEDNN_OPTS="0") == {"env": "0", "onednn": False, "backend": "tensorflow"}
    assert _probe(TF_ENABLE_ONEDNN_OPTS="1") == {"env": "1", "onednn": True, "backend": "tensorflow"}


def test_earlier_tensorflow_import_keeps_tensorflows_default(tensorflow_default):
    # TensorFlow imported first: too late to change its kernels, so nothing is set and TF's
    # default for this CPU stays (off on e.g. Zen 3, on on e.g. Zen 5: read, not assumed)
    assert _probe(before="import tensorflow") == {"env": None, "onednn": tensorflow_default, "backend": "tensorflow"}


def test_tensorflow_default_matches_the_documented_cpu_rule(tensorflow_default):
    """README / _backend say: on by default iff the CPU has AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX."""
    expected = cpu.cpu_info()["onednn_default_expected"]
    if expected is None:
        pytest.skip("TensorFlow's default policy is only documented here for Linux x86-64")
    assert tensorflow_default is expected, cpu.describe()


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
