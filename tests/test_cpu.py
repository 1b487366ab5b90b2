"""detreg_keras.cpu: CPU identification and TensorFlow's documented oneDNN default policy."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from detreg_keras import cpu

# Trimmed /proc/cpuinfo blocks of three real CPUs (flags shortened to the relevant ones plus a few).
ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
stepping\t: 1
cpu MHz\t\t: 2450.000
flags\t\t: fpu sse2 avx fma avx2 bmi2 sha_ni vaes

processor\t: 1
vendor_id\t: AuthenticAMD
flags\t\t: fpu avx512_vnni
"""
ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu avx fma avx2 avx512f avx512dq avx512bw avx512vl avx_vnni avx512_bf16 avx512_vnni
"""
SKYLAKE_X = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 85
model name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz
flags\t\t: fpu avx fma avx2 avx512f avx512dq avx512cd avx512bw avx512vl
"""


def test_parse_cpuinfo_reads_the_first_processor_only():
    info = cpu.parse_cpuinfo(ZEN3)
    assert info["model_name"] == "AMD EPYC 7B13" and info["family"] == "25" and info["model"] == "1"
    assert info["vendor"] == "AuthenticAMD" and info["mhz"] == "2450.000" and info["stepping"] == "1"
    assert "avx2" in info["flags"] and "avx512_vnni" not in info["flags"]  # the second block's flag is ignored


def test_parse_cpuinfo_of_garbage_has_no_fields():
    info = cpu.parse_cpuinfo("nothing useful here")
    assert info["flags"] == [] and info["model_name"] is None and info["family"] is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [(ZEN3, False), (ZEN5, True), (SKYLAKE_X, False)],  # AVX-512F alone (Skylake-X) does not turn it on
    ids=["zen3", "zen5", "skylake-x"],
)
def test_onednn_default_policy_on_linux_x86(text, expected):
    flags = cpu.parse_cpuinfo(text)["flags"]
    assert cpu.onednn_default_expected(flags, system="Linux", machine="x86_64") is expected


def test_onednn_default_policy_is_unknown_elsewhere():
    flags = cpu.parse_cpuinfo(ZEN5)["flags"]
    assert cpu.onednn_default_expected(flags, system="Windows", machine="AMD64") is None
    assert cpu.onednn_default_expected(flags, system="Linux", machine="aarch64") is None


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux /proc/cpuinfo")
def test_cpu_info_of_this_machine_agrees_with_grep():
    info = cpu.cpu_info()
    json.dumps(info)  # serialisable for the bench JSON
    first_flags = subprocess.run(["grep", "-m1", "^flags", "/proc/cpuinfo"], capture_output=True, text=True,
                                 check=True).stdout.split(":", 1)[1].split()  # fmt: skip
    assert info["flags"] == [f for f in cpu.REPORTED_FLAGS if f in first_flags]
    assert info["logical_cpus"] == os.cpu_count()
    family = subprocess.run(["grep", "-m1", "^cpu family", "/proc/cpuinfo"], capture_output=True, text=True,
                            check=True).stdout.split(":", 1)[1].strip()  # fmt: skip
    assert info["family"] == family
    line = cpu.describe(info)
    assert f"family {family}" in line and f"{os.cpu_count()} CPUs" in line
