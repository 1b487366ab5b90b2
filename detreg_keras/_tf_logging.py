"""TensorFlow's C++ log lines: one level for all of them, including its start-up lines.

TensorFlow filters its C++ log lines by ``TF_CPP_MIN_LOG_LEVEL`` (0 all, 1 no
INFO, 2 no WARNING, 3 no ERROR) -- except the lines it writes *while it is being
imported*, before absl's logging is initialised ("WARNING: All log messages
before absl::InitializeLog() is called are written to STDERR", oneDNN, "Could
not find cuda drivers"), which TF 2.21 prints whatever the level. They come
twice: once from ``_pywrap_tensorflow_internal.so`` and once from
``_pywrap_profiler_plugin.so``, which ``import tensorflow`` loads for
``tf.profiler.experimental.client`` and which carries its own copy of TF's C++
platform code (TensorFlow itself is imported once).

:func:`import_tensorflow` imports TensorFlow with the process's stderr (file
descriptor 2) captured and writes back every line except the log lines below
the level, so the same ``TF_CPP_MIN_LOG_LEVEL`` rule covers the start-up lines
too. ``import detreg_keras`` sets the level to 2 when it is unset (INFO and
WARNING off); the command-line scripts set 3 (no C++ log line at all, e.g. not
the ERROR "failed call to cuInit" of CPU-only machines). A level the user set
is never changed.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

#: The environment variable TensorFlow reads.
LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
#: absl/TF log line: severity letter, MMDD, time, thread id, file:line]
_LOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ [^\]\s]+\] ")
_PRE_INIT_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_SEVERITIES = "IWEF"


def log_level(default: int = 2) -> int:
    """The ``TF_CPP_MIN_LOG_LEVEL`` in force, setting it to ``default`` when unset.

    Args:
        default: the level to set when the variable is unset or not an integer.

    Returns:
        The level (0-3).
    """
    value = os.environ.get(LEVEL_VARIABLE)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        os.environ[LEVEL_VARIABLE] = str(default)
        return default


def keep_line(line: str, level: int) -> bool:
    """Whether a stderr line written during ``import tensorflow`` is shown at ``level``.

    Lines that are not TensorFlow log lines (Python warnings, tracebacks) are
    always kept.
    """
    if line.rstrip("\r\n") == _PRE_INIT_NOTICE:
        return level <= 0
    match = _LOG_LINE.match(line)
    if match is None:
        return True
    return _SEVERITIES.index(match.group(1)) >= level


def filter_lines(text: str, level: int) -> str:
    """The lines of ``text`` kept by :func:`keep_line`."""
    return "".join(line for line in text.splitlines(keepends=True) if keep_line(line, level))


def import_tensorflow(default_level: int = 2) -> None:
    """Imports TensorFlow, dropping its start-up log lines below ``TF_CPP_MIN_LOG_LEVEL``.

    A no-op when TensorFlow is already imported. The level is
    :func:`log_level` (``default_level`` when the variable is unset).
    """
    level = log_level(default_level)
    if "tensorflow" in sys.modules:
        return
    try:
        saved = os.dup(2) if level > 0 else None
    except OSError:  # no stderr file descriptor (e.g. a detached process): nothing to filter
        saved = None
    if saved is None:
        import tensorflow  # noqa: PLC0415
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401, PLC0415
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            shown = filter_lines(captured.read().decode("utf-8", errors="replace"), level)
            if shown:
                sys.stderr.write(shown)
                sys.stderr.flush()
