"""Byte counts for people: the one formatter every table, log line and error message uses."""

from __future__ import annotations

_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def format_bytes(nbytes: float, unit: str | None = None) -> str:
    """``1536`` -> ``"1.5 KiB"``; binary units up to TiB, whole bytes below 1 KiB. ``unit`` fixes the unit (a
    table's column), with thousands separators."""
    if unit is not None:
        return f"{nbytes / _UNITS[unit]:,.1f} {unit}"
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
