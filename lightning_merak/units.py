"""Byte counts for people: the one formatter every table, log line and error message uses."""

from __future__ import annotations


def format_bytes(nbytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``; binary units up to TiB, whole bytes below 1 KiB."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
