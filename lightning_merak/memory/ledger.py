"""The ledger: what DELTA did with saved activation bytes, per step.

Counts are of *storages* (a view and its base count once, like DTR's alias pools). ``resident`` follows
the saved bytes that really sit on the device: kept storages from pack until autograd frees them, swapped
storages from swap-in until freed, replayed storages from recompute until their segment's backward is
done. ``peak`` is its maximum within the step; the planner keeps it within the activation allowance.

The ledger counts saved activations only. The device holds more: parameters and gradients (the rest of
the budget), optimizer state, the batch, the logits and loss, activation gradients in backward, temporary
buffers, and tensors waiting for their copy. So each step also records the real process peak beside it
(:func:`process_peak_bytes`: ``torch.cuda.max_memory_allocated`` on CUDA, peak RSS on CPU), for
comparison only; the budget keeps its meaning.
"""

from __future__ import annotations

import resource
import sys
import threading

import torch

from lightning_merak.units import format_bytes


def _fmt(n: float) -> str:
    return format_bytes(n, unit="MiB")  # one unit down a table's columns


def process_peak_bytes(device: torch.device) -> int:
    """The real peak of the process so far: ``torch.cuda.max_memory_allocated`` for a CUDA device, else the
    peak resident set size (VmHWM; ``ru_maxrss`` where /proc is missing)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def process_peak_name(device: torch.device) -> str:
    return "max_memory_allocated" if device.type == "cuda" else "peak RSS"


class MemoryLedger:
    """Per-step byte counts of saved tensors: kept, swapped, recomputed, and the resident peak."""

    def __init__(self, budget_bytes: int, param_bytes: int = 0, device: torch.device | str = "cpu") -> None:
        self.budget_bytes = budget_bytes
        self.param_bytes = param_bytes
        self.device = torch.device(device)
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
            "delta/process_peak_bytes": float(process_peak_bytes(self.device)),
        }
        self.history.append(stats)
        self._reset()
        return stats

    def summary_table(self) -> str:
        """A fixed-width table of every step so far (printed at the end of fit)."""
        real = f"process {process_peak_name(self.device)}"
        head = (f"{'step':>5} {'phase':>8} {'kept':>14} {'swapped':>14} {'recomputed':>14} {'peak':>14} "
                f"{'allowance':>14} {real:>26}")
        lines = [
            "DELTA memory ledger: saved activations only (kept, prefetched and replayed storages); budget "
            f"{_fmt(self.budget_bytes)} = 2 x params {_fmt(self.param_bytes)} + allowance. The last column is the "
            "real process peak so far, which also holds parameters, gradients, optimizer state, batch, logits, "
            "activation gradients and temporaries.",
            head,
            "-" * len(head),
        ]
        for i, s in enumerate(self.history):
            phase = "profile" if s["delta/profiling"] else "planned"
            lines.append(
                f"{i:>5} {phase:>8} {_fmt(s['delta/kept_bytes']):>14} {_fmt(s['delta/swapped_bytes']):>14} "
                f"{_fmt(s['delta/recomputed_bytes']):>14} {_fmt(s['delta/peak_bytes']):>14} "
                f"{_fmt(s['delta/allowance_bytes']):>14} {_fmt(s['delta/process_peak_bytes']):>26}"
            )
        if self.history:
            worst = max(s["delta/peak_bytes"] for s in self.history)
            lines.append(
                f"max saved-activation peak {_fmt(worst)} of allowance {_fmt(self.allowance)}; real process peak "
                f"({process_peak_name(self.device)}) {_fmt(self.history[-1]['delta/process_peak_bytes'])}"
            )
        return "\n".join(lines)
