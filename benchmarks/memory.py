"""Side by side at one memory budget: no management, full checkpointing, torch's save_on_cpu, and DELTA.

    python benchmarks/memory.py [--models resnet50 gpt2] [--rounds 5] [--device cuda]

On a machine whose torch fails lightning_merak's version check, load it the way gpu_check.sh does:
    python3 -c "import sys,types,runpy; p=types.ModuleType('lightning_merak'); p.__path__=['lightning_merak'];
    sys.modules['lightning_merak']=p; sys.argv=['memory.py','--b0','4','--cap','8']; runpy.run_path('benchmarks/memory.py', run_name='__main__')"

For each model the budget is fixed so that the unmanaged run *just* fits a base batch ``b0``:
``budget = 2 x parameter bytes + saved bytes of the unmanaged run at b0`` (DELTA's budget semantics:
parameters, their gradients, saved activations). Each mode's largest batch is found by doubling from b0
while it fits, then bisecting between the last fit and the first miss (capped at ``--cap`` x b0).

This CPU has no device limit to run into, so "fits" is decided from saved-activation bytes resident on
the device, measured on a real step at that batch:

- none: every saved storage (distinct storages seen by ``saved_tensors_hooks``; all alive at forward end);
- full checkpointing (non-reentrant ``checkpoint`` on every DELTA segment): the storages still saved
  outside the checkpoints (segment inputs, the rest of the model) plus the largest segment's saved bytes,
  which its recompute brings back at once in backward;
- save_on_cpu: the largest segment's saved bytes (unpacks bring back at most one layer at a time);
  on a real device its limit is host memory and transfer time, which this model does not see;
- DELTA: the ledger's peak (real accounting of kept, prefetched and replayed storages), with a plan that
  fits and a budget above DELTA's minimum.

Step time is measured on real steps, all four modes side by side in one process, each on its own copy of
the model: after a warm-up (DELTA: two profiling steps and one planned step per shape), ``--rounds`` rounds
each time one step of every mode, the order rotating from round to round, so that load from other
processes falls on every mode alike. Reported: the median and the range over rounds, and the per-round
ratio of DELTA to full checkpointing (median and range). Two batches are timed: one common batch
(``2.5 x b0``: the unmanaged run is over budget there and timed only as a reference; a mode whose largest
batch is smaller is marked as over budget) and each mode's own largest batch (samples/s).

Memory per timed step, two measures side by side: DELTA's ledger peak (saved activations only, what the
budget's allowance bounds) and the real rise of the process during the step (CPU: peak RSS, reset through
``/proc/self/clear_refs``, minus RSS before the step; CUDA: ``max_memory_allocated`` minus the memory
allocated before the step), which also holds gradients, logits, activation gradients and temporaries.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import ctypes.util
import logging
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from lightning_merak.config import MerakConfigError
from lightning_merak.memory import DeltaScheduler, find_segments

MODES = ("none", "full", "save_on_cpu", "delta")
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))


def build(name: str, device: torch.device) -> tuple[nn.Module, Callable[[int], dict]]:
    """A model from a transformers config (random init) and a batch maker."""
    from transformers import GPT2Config, GPT2LMHeadModel, ResNetConfig, ResNetForImageClassification

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    if name == "resnet50":
        cfg = ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck",
                           num_labels=100)
        model = ResNetForImageClassification(cfg)
        size = 64 if device.type == "cuda" else 32

        def batch(b: int) -> dict:
            return {"pixel_values": torch.randn(b, 3, size, size, device=device),
                    "labels": torch.randint(0, 100, (b,), device=device)}
    else:
        cuda = device.type == "cuda"
        cfg = GPT2Config(n_layer=12 if cuda else 6, n_embd=768 if cuda else 256, n_head=12 if cuda else 4,
                         vocab_size=8192, n_positions=256, use_cache=False, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
        seq = 256 if device.type == "cuda" else 128

        def batch(b: int) -> dict:
            x = torch.randint(0, 8192, (b, seq), device=device)
            return {"input_ids": x, "labels": x}
    return model.to(device).train(), batch


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class SavedBytes:
    """Distinct non-parameter storages saved under these hooks, and per segment call (for the largest)."""

    def __init__(self, model: nn.Module) -> None:
        self.params = {id(t.untyped_storage()) for t in list(model.parameters()) + list(model.buffers())}
        self.held: dict[int, torch.UntypedStorage] = {}
        self.per_segment: list[int] = []
        self.hooks = []
        for _, seg in find_segments(model):
            self.hooks.append(seg.register_forward_pre_hook(lambda m, a: self.per_segment.append(-len(self.held))))
            self.hooks.append(seg.register_forward_hook(lambda m, a, o: self._close_segment()))

    def _close_segment(self) -> None:
        start = -self.per_segment.pop()
        ids = list(self.held)[start:]
        self.per_segment.append(sum(self.held[i].nbytes() for i in ids))

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if id(s) not in self.params:
            self.held.setdefault(id(s), s)  # held alive for the measurement, so ids are not reused
        return t

    @property
    def total(self) -> int:
        return sum(s.nbytes() for s in self.held.values())

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def checkpoint_segments(model: nn.Module) -> Callable[[], None]:
    """Full checkpointing: every DELTA segment through non-reentrant checkpoint; returns an undo."""
    undo = []
    for _, seg in find_segments(model):
        inner = seg.forward

        def wrapped(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        seg.forward = wrapped
        undo.append(seg)

    def restore() -> None:
        for seg in undo:
            del seg.forward

    return restore


class Runner:
    """One model in one mode: steps, resident saved bytes, timing."""

    def __init__(self, model: nn.Module, batch: Callable[[int], dict], mode: str, budget: int,
                 profile_steps: int = 1) -> None:
        self.model, self.batch, self.mode, self.budget = model, batch, mode, budget
        self.device = next(model.parameters()).device
        self.undo = checkpoint_segments(model) if mode == "full" else None
        self.delta = DeltaScheduler(model, budget, profile_steps=profile_steps) if mode == "delta" else None
        self.segment_bytes = 0  # largest segment's saved bytes, measured unmanaged

    def close(self) -> None:
        if self.undo:
            self.undo()
        if self.delta:
            self.delta.close()

    def _forward_ctx(self):
        if self.mode == "save_on_cpu":
            return torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")
        if self.mode == "delta":
            return self.delta.forward()
        return contextlib.nullcontext()

    def step(self, b: int, measure: SavedBytes | None = None) -> dict | None:
        data = self.batch(b)
        self.model.zero_grad(set_to_none=True)
        with self._forward_ctx(), (saved_tensors_hooks(measure.pack, lambda t: t) if measure else contextlib.nullcontext()):
            loss = self.model(**data).loss
        loss.backward()
        return self.delta.end_step() if self.delta else None

    def resident_saved(self, b: int) -> int | None:
        """Peak saved bytes on the device at batch b (see the module docstring); None if DELTA refuses."""
        if self.mode == "delta":
            try:
                self.step(b)  # a new shape: profiled
                stats = self.step(b)  # planned
            except MerakConfigError:
                return None
            plan = self.delta.plans.get(next(reversed(self.delta.plans)))
            return int(stats["delta/peak_bytes"]) if plan is not None and plan.fits else None
        probe = SavedBytes(self.model)
        if self.mode == "full":
            self.step(b, probe)  # outer hooks see what checkpoint keeps
            kept = probe.total
            probe.remove()
            return kept + self._largest_segment(b)
        if self.mode == "save_on_cpu":
            probe.remove()
            return self._largest_segment(b)
        self.step(b, probe)
        probe.remove()
        return probe.total

    def _largest_segment(self, b: int) -> int:
        undo, self.undo = self.undo, None
        if undo:
            undo()
        probe = SavedBytes(self.model)
        data = self.batch(b)
        with saved_tensors_hooks(probe.pack, lambda t: t):
            self.model(**data)
        probe.remove()
        if undo:
            self.undo = checkpoint_segments(self.model)
        return max(probe.per_segment, default=0)

    def fits(self, b: int) -> bool:
        resident = self.resident_saved(b)
        return resident is not None and 2 * param_bytes(self.model) + resident <= self.budget

    def warm(self, b: int) -> None:
        """Steps not timed: DELTA's profiling steps for this shape, then one planned step; else one step."""
        for _ in range(self.delta.profile_steps if self.delta else 0):
            self.step(b)
        self.step(b)
        self.model.zero_grad(set_to_none=True)

    def timed_step(self, b: int) -> tuple[float, int, float]:
        """(seconds, real memory rise of the process during the step, ledger peak or nan)."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        before = _process_now(self.device)
        t0 = time.perf_counter()
        stats = self.step(b)
        sync()
        seconds = time.perf_counter() - t0
        rise = _process_peak(self.device) - before
        self.model.zero_grad(set_to_none=True)  # the next mode's step starts without this mode's grads
        return seconds, rise, stats["delta/peak_bytes"] if stats else float("nan")


def _process_now(device: torch.device) -> int:
    """Memory in use now, and the peak counter reset to it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    if hasattr(_LIBC, "malloc_trim"):  # glibc: freed heap pages back to the system, so the step's peak shows
        _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux)
        f.write("5")
    return _status("VmRSS")


def _process_peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status("VmHWM")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def largest_batch(runner: Runner, b0: int, cap: int) -> int:
    """Doubling from b0 while it fits, then bisection; 0 if b0 itself does not fit."""
    if not runner.fits(b0):
        return 0
    lo, hi = b0, None
    while hi is None:
        nxt = lo * 2
        if nxt > cap * b0:
            return lo
        if runner.fits(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if runner.fits(mid) else (lo, mid)
    return lo


def bench(name: str, b0: int, cap: int, rounds: int, device: torch.device) -> dict:
    base, batch = build(name, device)
    probe = SavedBytes(base)
    torch.manual_seed(1)
    with saved_tensors_hooks(probe.pack, lambda t: t):
        base(**batch(b0))
    probe.remove()
    budget = 2 * param_bytes(base) + probe.total
    print(f"\n## {name}: budget {budget / 2**20:.1f} MiB = 2 x params {param_bytes(base) / 2**20:.1f} MiB "
          f"+ unmanaged saved bytes at b0={b0} ({probe.total / 2**20:.1f} MiB)", flush=True)
    common = int(2.5 * b0 + 0.5)
    best: dict[str, int] = {}
    for mode in MODES:
        runner = Runner(base, batch, mode, budget)
        best[mode] = largest_batch(runner, b0, cap)
        runner.close()
        print(f"  {mode}: largest batch {best[mode]}", flush=True)

    # Timing: one copy of the model per mode, modes alternating within each round.
    runners = {mode: Runner(copy.deepcopy(base), batch, mode, budget, profile_steps=2) for mode in MODES}
    shapes = {mode: sorted({common, best[mode]} - {0}) for mode in MODES}
    plans: dict[int, str] = {}
    for mode, runner in runners.items():
        for b in shapes[mode]:
            runner.warm(b)
            if runner.delta:  # a new shape's plan is the newest
                plans[b] = list(runner.delta.plans.values())[-1].describe()
    times: dict[tuple[str, int], list[float]] = {(m, b): [] for m in MODES for b in shapes[m]}
    rises: dict[tuple[str, int], list[int]] = {k: [] for k in times}
    ledger: dict[tuple[str, int], float] = {}
    for r in range(rounds):
        order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
        for mode in order:
            for b in shapes[mode]:
                seconds, rise, peak = runners[mode].timed_step(b)
                times[(mode, b)].append(seconds)
                rises[(mode, b)].append(rise)
                ledger[(mode, b)] = peak
    for runner in runners.values():
        runner.close()

    def med(key: tuple[str, int]) -> float:
        return statistics.median(times[key])

    real = "max_memory_allocated" if device.type == "cuda" else "peak RSS"
    print(f"timing: {rounds} rounds, modes alternating; median [min-max] over rounds; memory: DELTA's ledger "
          f"peak (saved activations) and the real process rise during the step ({real})")
    print(f"{'mode':<12} {'max batch':>9} {'x none':>7} | {'s/step @' + str(common):>13} {'[min-max]':>15} "
          f"{'x none':>7} {'fits':>5} {'ledger MiB':>10} {'process MiB':>11} | {'samples/s @max':>14} {'x none':>7}")
    ref_common = med(("none", common))
    ref_sps = best["none"] / med(("none", best["none"])) if best["none"] else float("nan")
    rows = {}
    for mode in MODES:
        key = (mode, common)
        t = times[key]
        sps = best[mode] / med((mode, best[mode])) if best[mode] else float("nan")
        fits = "yes" if best[mode] >= common else "no"
        lpeak = ledger[key] / 2**20
        spread = f"[{min(t):.3f}-{max(t):.3f}]"
        ledger_mib = "-" if lpeak != lpeak else f"{lpeak:.1f}"
        print(f"{mode:<12} {best[mode]:>9} {best[mode] / best['none']:>7.2f} | {med(key):>13.3f} {spread:>15} "
              f"{med(key) / ref_common:>7.2f} {fits:>5} {ledger_mib:>10} "
              f"{statistics.median(rises[key]) / 2**20:>11.1f} | {sps:>14.1f} {sps / ref_sps:>7.2f}")
        rows[mode] = {"batch": best[mode], "s_common": med(key), "x_none": med(key) / ref_common}
    paired = [d / f for d, f in zip(times[("delta", common)], times[("full", common)], strict=True)]
    ratio = statistics.median(paired)
    print(f"DELTA / full checkpointing at batch {common} (same budget), per round: median {ratio:.2f} "
          f"[{min(paired):.2f}-{max(paired):.2f}]  ({'DELTA faster' if ratio < 1 else 'DELTA slower'})")
    print(f"DELTA plan at batch {common}: {plans.get(common, '?')}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "gpt2"], choices=["resnet50", "gpt2"])
    parser.add_argument("--b0", type=int, default=2, help="batch the unmanaged run just fits")
    parser.add_argument("--cap", type=int, default=16, help="search up to cap x b0")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (one step of every mode each)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="DELTA: no plan fits")
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    for name in args.models:
        bench(name, args.b0, args.cap, args.rounds, torch.device(args.device))


if __name__ == "__main__":
    main()
