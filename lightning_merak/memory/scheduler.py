"""DeltaScheduler: per saved storage, keep it, swap it out and prefetch it back, or recompute it.

Mechanism (reference/delta.md section 6), one module per part:

- ``saved_tensors_hooks`` around each managed forward (a :class:`~lightning_merak.memory.run.ForwardRun`)
  see every saved tensor and group it by storage into alias pools (``pools.py``), kept or swapped out to a
  :class:`~lightning_merak.memory.swap.SwapTier` and prefetched in backward.
- Recompute is segment-level: the innermost repeated blocks (``find_segments``) and every module inside
  them (``segment_tree``: segments nest) run through a wrapper; a call the plan recomputes is replayed in
  backward, bitwise (``replay.py``).
- The first ``profile_steps`` steps for each input signature swap every storage above ``min_swap_bytes``
  (memory-safe whatever the budget) and measure bytes, lifetimes, segment times and bandwidth; then the
  planner's filter and director fix the decisions for that signature. A new signature is profiled anew; the
  plans (and profiles) of the ``PLAN_CACHE`` most recently used signatures are kept.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_merak import failures
from lightning_merak._compat import local_shard
from lightning_merak.config import MerakConfigError, parse_bytes
from lightning_merak.intercept import ForwardWrap, wrap_forward
from lightning_merak.memory.ledger import MemoryLedger
from lightning_merak.memory.planner import Plan, minimum_allowance, plan_forward
from lightning_merak.memory.profiler import ForwardProfile, segment_tree
from lightning_merak.memory.run import ForwardRun
from lightning_merak.memory.swap import SwapTier, make_tier
from lightning_merak.trace import shape_signature
from lightning_merak.trace.capture import ShapeCache
from lightning_merak.units import format_bytes

PLAN_CACHE = 8  # input-shape signatures whose plan and profiles are kept (least recently used dropped first)


class DeltaScheduler:
    """Dynamic per-storage swap-or-recompute under a memory budget (DELTA, Tang et al. 2022).

    Args:
        module: the module whose forward is managed (its repeated blocks become recompute segments).
        memory_budget: bytes per device, or a string like ``"20GiB"``. It covers parameters, their
            gradients and saved activations: the activation allowance is ``budget - 2 * parameter bytes``.
        profile_steps: steps profiled per input signature before decisions are planned.
        swap_dir: directory of the swap file on CPU-only runs (default: ``swap.default_swap_dir()``, a
            disk-backed temporary folder: swapping into a RAM-backed /tmp would save no memory).
        swap_bandwidth: override the measured swap bandwidth (bytes/s), e.g. to study the director.
        min_swap_bytes: storages smaller than this are always kept.
        prefetch_depth: swapped storages fetched ahead of use in backward.
        group: the process group whose ranks each run a scheduler and close their steps together (the
            strategy's world); the minimum-budget check, which fails on some stages only, then fails on all
            of them at once (``failures.agree``). None: this process alone.
    """

    def __init__(
        self,
        module: nn.Module,
        memory_budget: int | str,
        profile_steps: int = 2,
        swap_dir: str | None = None,
        swap_bandwidth: float | None = None,
        min_swap_bytes: int = 4096,
        prefetch_depth: int = 4,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        budget = parse_bytes(memory_budget, "memory_budget")
        if budget is None:
            raise MerakConfigError("DeltaScheduler needs a memory_budget (bytes or a string like '20GiB').")
        if profile_steps < 1:
            raise MerakConfigError(f"profile_steps={profile_steps!r} must be >= 1.")
        self.module = module
        self.profile_steps = profile_steps
        self.swap_dir = swap_dir
        self.swap_bandwidth = swap_bandwidth
        self.min_swap_bytes = min_swap_bytes
        self.prefetch_depth = prefetch_depth
        params = {id(local_shard(p).untyped_storage()): local_shard(p).untyped_storage().nbytes() for p in module.parameters()}
        first = next(module.parameters(), None)
        self.device = local_shard(first).device if first is not None else torch.device("cpu")
        self.ledger = MemoryLedger(budget, sum(params.values()), self.device)
        self.param_storages: set[int] = set()
        self.plans: ShapeCache[Plan] = ShapeCache(PLAN_CACHE)
        self.profiles: ShapeCache[list[ForwardProfile]] = ShapeCache(PLAN_CACHE)
        self.group = group
        self.bandwidth: tuple[float, float] | None = None
        self.in_flight = 1
        self._tiers: dict[torch.device, SwapTier] = {}
        self._runs: list[ForwardRun] = []
        self._forwards_since_backward = 0
        self._active: list[ForwardRun] = []
        self._checked = False
        self._agreed = False  # the first end_step agrees on the budget check over ``group``
        self.segments = segment_tree(module)
        self._wraps: list[ForwardWrap] = []
        self._pre_hook: Any = None
        self.attach()
        self._auto = 0
        self._auto_hooks: list = []
        self.last_stats: dict[str, float] = {}  # metrics of the last step closed by step()

    # -- public API ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Manage the saved tensors of one forward (enter once per micro-batch)."""
        run = self._open()
        try:
            yield
        finally:
            self._close(run)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Standalone convenience: every call of ``module`` in the block is managed; closes the step."""
        self._auto += 1
        if self._auto == 1:
            self._auto_hooks = [
                self.module.register_forward_pre_hook(lambda m, a: self._auto_open()),
                self.module.register_forward_hook(lambda m, a, o: self._auto_close(), always_call=True),
            ]
        try:
            yield
        finally:
            self._auto -= 1
            if self._auto == 0:
                for h in self._auto_hooks:
                    h.remove()
                self._auto_hooks = []
            self.last_stats = self.end_step()

    def end_step(self) -> dict[str, float]:
        """Close the step: plan from finished profiles, then return the ledger's metrics for logging."""
        profiled = [r for r in self._runs if r.profile is not None]
        phase = "profile" if profiled else "planned"
        for run in profiled:
            self.profiles.setdefault(run.signature, []).append(run.profile)
        first = profiled[-1].profile if profiled and not self._checked else None
        self._checked = self._checked or first is not None
        if not self._agreed:  # the first step closed, on every rank of the group at once: fail on all or none
            self._agreed = True
            failures.agree(lambda: self._check_budget(first) if first is not None else None,
                           "DELTA's memory budget check", self.group)
        elif first is not None:
            self._check_budget(first)
        for run in profiled:
            done = self.profiles[run.signature]
            if len(done) >= self.profile_steps and run.signature not in self.plans:
                plan = self._plan(done)
                self.plans[run.signature] = plan
                if not plan.fits:
                    warnings.warn(
                        f"DELTA: no plan fits the activation allowance of {self.forward_allowance} bytes "
                        f"({plan.describe()}); the step runs with every candidate released.",
                        stacklevel=2,
                    )
        self._runs = []
        self._forwards_since_backward = 0
        return self.ledger.end_step(phase)

    @property
    def forward_allowance(self) -> int:
        """Activation bytes one forward may hold: the allowance shared by the forwards in flight."""
        return self.ledger.allowance // max(self.in_flight, 1)

    def recomputed_modules(self) -> list[str]:
        """Names of the segments some plan recomputes (stage-aware recompute should leave them alone)."""
        indices = {seg for plan in self.plans.values() for seg, _ in plan.recompute}
        return [self.segments[i][0] for i in sorted(indices)]

    def attach(self) -> None:
        """Manage the module's segments (again after ``close``: profiles and plans are kept)."""
        if self._pre_hook is not None:
            return
        for index, (_, seg) in enumerate(self.segments):
            self._wrap(index, seg)
        self._pre_hook = self.module.register_forward_pre_hook(self._on_module_call, with_kwargs=True)

    def close(self) -> None:
        """Undo every hook and wrapper and free the swap tiers (``attach`` manages the module again)."""
        for wrap in self._wraps:
            wrap.remove()
        self._wraps = []
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None
        for tier in self._tiers.values():
            tier.close()
        self._tiers = {}

    # -- internals -----------------------------------------------------------------------------------
    def _wrap(self, index: int, seg: nn.Module) -> None:
        """Segment calls go through the run (``intercept`` layer "memory": outside a pipeline stage's dispatch,
        so a replay re-runs exactly what the stage ran)."""
        def wrapper(inner: Any) -> Any:
            def managed(*args: Any, **kwargs: Any) -> Any:
                run = self._active[-1] if self._active else None
                if run is None or not torch.is_grad_enabled() or (run.top is not None and run.top.index == index):
                    return inner(*args, **kwargs)
                return run.call_segment(index, seg, inner, args, kwargs)
            return managed

        self._wraps.append(wrap_forward(seg, "memory", wrapper))

    def _on_module_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._active and self._active[-1].signature is None and not self._active[-1].resolved:
            self._active[-1].signature = shape_signature(args, kwargs)

    def _auto_open(self) -> None:
        if torch.is_grad_enabled():
            self._open()

    def _auto_close(self) -> None:
        if self._active:
            self._close(self._active[-1])

    def _open(self) -> ForwardRun:
        if not self._active:
            tensors = list(self.module.parameters()) + list(self.module.buffers())
            self.param_storages = {id(local_shard(t).untyped_storage()) for t in tensors}
        run = ForwardRun(self)
        run.t_start = time.perf_counter()
        self._active.append(run)
        self._runs.append(run)
        self._forwards_since_backward += 1
        run.hooks.__enter__()
        return run

    def _close(self, run: ForwardRun) -> None:
        run.hooks.__exit__(None, None, None)
        self._active.remove(run)
        self.sync()
        run.close_forward()

    def backward_started(self, run: ForwardRun) -> None:
        if run.profile is not None:
            self.in_flight = max(self.in_flight, self._forwards_since_backward)
        self._forwards_since_backward = 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def tier_for(self, device: torch.device) -> SwapTier:
        if device not in self._tiers:
            self._tiers[device] = make_tier(device, self.swap_dir)
        return self._tiers[device]

    def _check_budget(self, profile: ForwardProfile) -> None:
        need = minimum_allowance(profile) * max(self.in_flight, 1)
        minimum = 2 * self.ledger.param_bytes + need
        if self.ledger.budget_bytes < minimum:
            raise MerakConfigError(
                f"memory_budget={self.ledger.budget_bytes} bytes ({format_bytes(self.ledger.budget_bytes)}) is "
                f"below the minimum of {minimum} bytes ({format_bytes(minimum)}): parameters and gradients "
                f"need {2 * self.ledger.param_bytes} bytes and the largest layer's saved tensors {need} bytes "
                f"at once in backward. Raise memory_budget to at least {minimum} or use a smaller batch."
            )

    def _plan(self, profiles: list[ForwardProfile]) -> Plan:
        profile = profiles[-1]
        for key, info in profile.segments.items():  # the least of the measured times: others only add noise
            info.seconds = min(p.segments[key].seconds for p in profiles if key in p.segments)
        tier = self.tier_for(self.device)
        measured = [p for p in profiles if p.swap_bytes and p.read_bytes]
        if not tier.write_overlaps and measured:
            # A synchronous tier: the profiling steps' own transfers, timed on the host, are the measure (a
            # page cache's speed depends on what the step has already written, not on a 16 MiB probe); the
            # best of them, as for compute times.
            self.bandwidth = (max(p.swap_bytes / max(p.swap_seconds, 1e-9) for p in measured),
                              max(p.read_bytes / max(p.read_seconds, 1e-9) for p in measured))
        elif self.bandwidth is None:
            self.bandwidth = tier.measure_bandwidth()  # asynchronous copies: timed with device events
        out_bw, in_bw = self.bandwidth
        if self.swap_bandwidth is not None:
            out_bw = in_bw = self.swap_bandwidth
        return plan_forward(profile, self.forward_allowance, out_bw, in_bw, tier.write_overlaps, tier.read_overlaps)
