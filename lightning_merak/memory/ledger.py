"""The ledger: what DELTA did with saved activation bytes, per step.

Counts are of *storages* (a view and its base count once, like DTR's alias pools). ``resident`` follows
the saved bytes that really sit on the device: kept storages from pack until autograd frees them, swapped
storages from swap-in until freed, replayed storages from recompute until their segment's backward is
done. ``peak`` is its maximum within the step; the planner keeps it within the activation allowance.
"""

from __future__ import annotations

import threading


def _fmt(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


class MemoryLedger:
    """Per-step byte counts of saved tensors: kept, swapped, recomputed, and the resident peak."""

    def __init__(self, budget_bytes: int, param_bytes: int = 0) -> None:
        self.budget_bytes = budget_bytes
        self.param_bytes = param_bytes
        self.history: list[dict[str, float]] = []
        self._lock = threading.Lock()
        self.resident = 0
        self._reset()

    @property
    def allowance(self) -> int:
        """Bytes left for saved activations: budget minus parameters and their gradients."""
        return self.budget_bytes - 2 * self.param_bytes

    def _reset(self) -> None:
        self.kept = 0
        self.swapped = 0
        self.recomputed = 0
        self.prefetched = 0
        self.peak = self.resident

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.resident += nbytes
            if self.resident > self.peak:
                self.peak = self.resident

    def sub(self, nbytes: int) -> None:
        with self._lock:
            self.resident -= nbytes

    def end_step(self, phase: str) -> dict[str, float]:
        """Close the step: return its metrics (names as logged) and start the next one."""
        stats = {
            "delta/kept_bytes": float(self.kept),
            "delta/swapped_bytes": float(self.swapped),
            "delta/recomputed_bytes": float(self.recomputed),
            "delta/peak_bytes": float(self.peak),
            "delta/prefetched_bytes": float(self.prefetched),
            "delta/allowance_bytes": float(self.allowance),
            "delta/profiling": 1.0 if phase == "profile" else 0.0,
        }
        self.history.append(stats)
        self._reset()
        return stats

    def summary_table(self) -> str:
        """A fixed-width table of every step so far (printed at the end of fit)."""
        head = f"{'step':>5} {'phase':>8} {'kept':>14} {'swapped':>14} {'recomputed':>14} {'peak':>14} {'allowance':>14}"
        lines = [
            "DELTA memory ledger (saved activations; budget "
            f"{_fmt(self.budget_bytes)} = 2 x params {_fmt(self.param_bytes)} + allowance)",
            head,
            "-" * len(head),
        ]
        for i, s in enumerate(self.history):
            phase = "profile" if s["delta/profiling"] else "planned"
            lines.append(
                f"{i:>5} {phase:>8} {_fmt(s['delta/kept_bytes']):>14} {_fmt(s['delta/swapped_bytes']):>14} "
                f"{_fmt(s['delta/recomputed_bytes']):>14} {_fmt(s['delta/peak_bytes']):>14} "
                f"{_fmt(s['delta/allowance_bytes']):>14}"
            )
        if self.history:
            worst = max(s["delta/peak_bytes"] for s in self.history)
            lines.append(f"max peak {_fmt(worst)} of allowance {_fmt(self.allowance)}")
        return "\n".join(lines)
