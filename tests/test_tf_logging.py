"""TensorFlow's C++ start-up log lines follow TF_CPP_MIN_LOG_LEVEL (detreg_keras._tf_logging)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from detreg_keras._tf_logging import filter_lines, keep_line
from tests.conftest import REPO_ROOT

NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
INFO = "I0000 00:00:1796194492.273208    5272 port.cc:153] oneDNN custom operations are on.\n"
WARN = "W0000 00:00:1796194492.273208    5272 some_file.cc:7] a warning\n"
ERROR = "E0000 00:00:1796194496.997650    5272 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n"
FATAL = "F0000 00:00:1796194496.997650    5272 x.cc:1] fatal\n"
PYTHON = "UserWarning: something Python said\n"


@pytest.mark.parametrize(
    ("level", "kept"),
    [(0, [NOTICE, INFO, WARN, ERROR, FATAL]), (1, [WARN, ERROR, FATAL]), (2, [ERROR, FATAL]), (3, [FATAL])],
)
def test_lines_below_the_level_are_dropped_and_other_output_kept(level, kept):
    text = NOTICE + INFO + WARN + ERROR + FATAL + PYTHON
    assert filter_lines(text, level) == "".join(kept) + PYTHON
    assert keep_line("Traceback (most recent call last):\n", 3)


_PROBE = "import os, sys; {imp}; import tensorflow as tf; tf.constant(1) + 1; print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))"
_LOG = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ (\S+:\d+)\]", re.M)


def _run(imp: str, **env: str) -> tuple[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    out = subprocess.run([sys.executable, "-c", _PROBE.format(imp=imp)], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300, env={**base, **env, "PYTHONPATH": str(REPO_ROOT)}, check=True)  # fmt: skip
    return out.stdout.strip(), out.stderr


def test_import_sets_level_2_and_drops_info_and_warning_start_up_lines():
    level, stderr = _run("import detreg_keras")
    assert level == "2"
    assert {severity for severity, _ in _LOG.findall(stderr)} <= {"E", "F"}, stderr
    assert "All log messages before absl" not in stderr


def test_a_level_the_user_set_is_kept_and_applied_like_tensorflow_does():
    """With TF_CPP_MIN_LOG_LEVEL=0 the package shows the same C++ lines as a bare `import tensorflow`."""
    level, stderr = _run("import detreg_keras", TF_CPP_MIN_LOG_LEVEL="0", TF_ENABLE_ONEDNN_OPTS="1")
    _, reference = _run("pass", TF_CPP_MIN_LOG_LEVEL="0", TF_ENABLE_ONEDNN_OPTS="1")
    assert level == "0"
    assert _LOG.findall(stderr) == _LOG.findall(reference)
    assert stderr.count("All log messages before absl") == reference.count("All log messages before absl")
    level, stderr = _run("import detreg_keras", TF_CPP_MIN_LOG_LEVEL="3")
    assert level == "3" and not _LOG.findall(stderr)
