"""The version of the installed ``detreg-keras`` distribution, read without importing TensorFlow."""

from __future__ import annotations

from functools import cache


@cache
def detreg_version() -> str:
    """Version of the installed ``detreg-keras`` distribution (``"unknown"`` in a source checkout not installed)."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("detreg-keras")
    except PackageNotFoundError:
        return "unknown"
