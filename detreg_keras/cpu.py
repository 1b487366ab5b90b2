"""The CPU a process runs on, and the kernels TensorFlow's x86 build picks on it by default.

Figures measured on one CPU do not carry over to another: TensorFlow's Linux x86
wheel turns its oneDNN kernels **on by default** only on CPUs with
"neural-network" instructions (``avx512_vnni``, ``avx512_bf16``, ``avx_vnni`` or
AMX, e.g. AMD Zen 4/5, Intel Ice Lake and later) and leaves them **off** elsewhere
(e.g. AMD Zen 3, or Skylake-X, which has AVX-512F but no VNNI): see
``DefaultOneDnnPolicy`` in TensorFlow's ``tensorflow/core/util/util.cc``. The
benchmarks record :func:`cpu_info` with every result, and the tests read the
default from a fresh interpreter (:func:`measure_tensorflow_onednn_default`)
instead of assuming it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

#: /proc/cpuinfo flags any one of which makes TensorFlow's Linux x86 build turn
#: oneDNN on by default (TensorFlow 2.9 and later).
ONEDNN_DEFAULT_FLAGS = ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")

#: The vector-ISA flags worth recording beside a benchmark figure.
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", *ONEDNN_DEFAULT_FLAGS)

_CPUINFO_FIELDS = {"model name": "model_name", "vendor_id": "vendor", "cpu family": "family", "model": "model",
                   "stepping": "stepping", "cpu MHz": "mhz"}  # fmt: skip


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Reads the first processor block of a ``/proc/cpuinfo`` text.

    Args:
        text: the file's contents.

    Returns:
        ``model_name``, ``vendor``, ``family``, ``model``, ``stepping``, ``mhz``
        (strings, ``None`` when absent) and ``flags`` (a sorted list).
    """
    block = text.split("\n\n", 1)[0]
    out: dict[str, Any] = dict.fromkeys(_CPUINFO_FIELDS.values())
    for key, name in _CPUINFO_FIELDS.items():
        match = re.search(rf"^{re.escape(key)}\s*:\s*(.*)$", block, re.M)
        if match:
            out[name] = match.group(1).strip()
    flags = re.search(r"^flags\s*:\s*(.*)$", block, re.M)
    out["flags"] = sorted(set(flags.group(1).split())) if flags else []
    return out


def onednn_default_expected(flags: list[str] | set[str], system: str | None = None,
                            machine: str | None = None) -> bool | None:
    """Whether TensorFlow's Linux x86 build turns oneDNN on by default on a CPU with these flags.

    Args:
        flags: the CPU's ``/proc/cpuinfo`` flags.
        system: ``platform.system()`` (default: this machine's).
        machine: ``platform.machine()`` (default: this machine's).

    Returns:
        ``True`` / ``False`` on Linux x86-64, ``None`` elsewhere (other policies apply).
    """
    system = platform.system() if system is None else system
    machine = platform.machine() if machine is None else machine
    if system != "Linux" or machine not in ("x86_64", "AMD64"):
        return None
    return any(flag in set(flags) for flag in ONEDNN_DEFAULT_FLAGS)


def cpu_info() -> dict[str, Any]:
    """This machine's CPU: model, family, the vector-ISA flags that matter, CPU count.

    Returns:
        A JSON-serialisable dict: ``model_name``, ``vendor``, ``family``, ``model``,
        ``stepping``, ``mhz``, ``flags`` (those of :data:`REPORTED_FLAGS` present),
        ``logical_cpus``, ``machine`` and ``onednn_default_expected``.
    """
    try:
        parsed = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux
        parsed = {**dict.fromkeys(_CPUINFO_FIELDS.values()), "model_name": platform.processor(), "flags": []}
    all_flags = parsed.pop("flags")
    return {
        **parsed,
        "flags": [flag for flag in REPORTED_FLAGS if flag in all_flags],
        "logical_cpus": os.cpu_count(),
        "machine": platform.machine(),
        "onednn_default_expected": onednn_default_expected(all_flags),
    }


def describe(info: dict[str, Any] | None = None) -> str:
    """One line naming the CPU, e.g. ``AMD EPYC (family 26, model 2), 2 CPUs, avx2 avx512f ...``."""
    info = cpu_info() if info is None else info
    flags = " ".join(info["flags"]) or "no AVX2"
    return (f"{info['model_name']} ({info['vendor']} family {info['family']}, model {info['model']}), "
            f"{info['logical_cpus']} CPUs, {flags}")


_DEFAULT_PROBE = (
    "import json\n"
    "from tensorflow.python.util import _pywrap_util_port\n"
    "print(json.dumps(bool(_pywrap_util_port.IsMklEnabled())))\n"
)


def measure_tensorflow_onednn_default(timeout_s: float = 300.0) -> bool:
    """Whether TensorFlow, imported alone with ``TF_ENABLE_ONEDNN_OPTS`` unset, runs oneDNN here.

    Runs a fresh interpreter (the choice is fixed at TensorFlow's first import).

    Args:
        timeout_s: limit for the child interpreter.

    Returns:
        TensorFlow's own default on this CPU.

    Raises:
        RuntimeError: if the child interpreter fails.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "TF_DISABLE_MKL")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    out = subprocess.run([sys.executable, "-c", _DEFAULT_PROBE], env=env, capture_output=True, text=True,
                         timeout=timeout_s, check=False)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"probing TensorFlow's oneDNN default failed: {out.stderr[-2000:]}")
    return bool(json.loads(out.stdout.strip().splitlines()[-1]))
