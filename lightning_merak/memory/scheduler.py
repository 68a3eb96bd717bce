"""DeltaScheduler: per saved storage, keep it, swap it out and prefetch it back, or recompute it.

Mechanism (reference/delta.md section 6):

- ``saved_tensors_hooks`` around each managed forward see every saved tensor. Tensors are grouped by
  storage identity into alias pools (DTR); never by ``data_ptr``. Parameters, buffers, tensor subclasses
  and tensors off the managed device pass through untouched.
- Recompute is segment-level: the innermost repeated blocks (``find_segments``) and every module inside
  them (``segment_tree``: segments nest) run through a wrapper. In a segment call the plan recomputes, each
  saved tensor (nested calls included) is replaced by a (segment call, index) handle and dropped; the
  call's inputs are kept, with its RNG and autocast state; the first unpack in backward replays the call
  under capturing hooks and hands out the regenerated tensors, so dropout masks and gradients are bitwise
  those of the unmanaged run. Buffers touched by the replay (BatchNorm statistics) are restored afterwards;
  an input modified in place since the call is an error.
- Swapped storages go to a :class:`~lightning_merak.memory.swap.SwapTier` at pack time and are prefetched
  in backward in the unpack order recorded while profiling, as far ahead as the allowance permits.
- The first ``profile_steps`` steps for each input signature swap every storage above ``min_swap_bytes``
  (memory-safe whatever the budget) and measure bytes, lifetimes, segment times and bandwidth; then the
  planner's filter and director fix the decisions for that signature. A new signature is profiled anew.
"""

from __future__ import annotations

import contextlib
import time
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.weak import WeakIdKeyDictionary

from lightning_merak.config import MerakConfigError, parse_bytes
from lightning_merak.memory.ledger import MemoryLedger
from lightning_merak.memory.planner import Plan, minimum_allowance, plan_forward
from lightning_merak.memory.profiler import ForwardProfile, PoolInfo, SegmentInfo, segment_tree
from lightning_merak.memory.swap import SwapTier, make_tier, storage_bytes


def _map_tensors(fn, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(fn, v) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(fn, v) for k, v in value.items()}
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _map_tensors(lambda t: out.append(t) or t, value)
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor behind a parameter (a DTensor's local shard under tensor parallelism)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _signature(args: tuple, kwargs: dict) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in _tensors((args, kwargs)))


class _SwapState:
    """The part of a swapped pool its finalizer needs (a finalizer must not reference the pool)."""

    __slots__ = ("ledger", "tier", "slot", "read", "buf", "resident")

    def __init__(self, ledger: MemoryLedger, tier: SwapTier) -> None:
        self.ledger, self.tier = ledger, tier
        self.slot = self.read = self.buf = None
        self.resident = 0

    def close(self) -> None:
        if self.resident:
            self.ledger.sub(self.resident)
        if self.slot is not None:
            if self.read is not None:
                self.read.wait()
            self.tier.release(self.slot)


class _Pool:
    """One saved storage (alias pool): kept, or swapped out."""

    __slots__ = ("key", "nbytes", "swapped", "state", "version", "info", "consumed", "__weakref__")

    def __init__(self, key: int | None, nbytes: int, ledger: MemoryLedger, tier: SwapTier | None) -> None:
        self.key, self.nbytes, self.swapped = key, nbytes, tier is not None
        self.info: PoolInfo | None = None
        self.consumed = False
        self.version = -1
        if tier is None:
            self.state = None
            ledger.kept += nbytes
            ledger.add(nbytes)
            weakref.finalize(self, ledger.sub, nbytes)
        else:
            self.state = _SwapState(ledger, tier)
            ledger.swapped += nbytes
            weakref.finalize(self, self.state.close)

    def write(self, t: torch.Tensor) -> None:
        st = self.state
        if st.slot is not None:
            st.tier.release(st.slot)
        st.slot = st.tier.swap_out(storage_bytes(t.untyped_storage()))
        self.version = t._version

    def prefetch(self) -> None:
        st = self.state
        if st.buf is None and st.read is None:
            st.read = st.tier.swap_in(st.slot)
            st.resident = self.nbytes
            st.ledger.add(self.nbytes)
            st.ledger.prefetched += self.nbytes

    def fetch(self) -> torch.Tensor:
        st = self.state
        if st.buf is None:
            if st.read is None:
                st.read = st.tier.swap_in(st.slot, asynchronous=False)
                st.resident = self.nbytes
                st.ledger.add(self.nbytes)
            st.buf = st.read.wait()
            st.read = None
        return st.buf


class _Kept:
    __slots__ = ("tensor", "pool", "run")

    def __init__(self, tensor: torch.Tensor, pool: _Pool, run: _ForwardRun) -> None:
        self.tensor, self.pool, self.run = tensor, pool, run

    def unpack(self) -> torch.Tensor:
        self.run.on_unpack(self.pool)
        return self.tensor


class _Swapped:
    __slots__ = ("pool", "run", "dtype", "size", "stride", "offset")

    def __init__(self, t: torch.Tensor, pool: _Pool, run: _ForwardRun) -> None:
        self.pool, self.run = pool, run
        self.dtype, self.size, self.stride, self.offset = t.dtype, t.size(), t.stride(), t.storage_offset()

    def unpack(self) -> torch.Tensor:
        self.run.on_unpack(self.pool)
        profile = self.run.profile
        if profile is None:
            buf = self.pool.fetch()
        else:  # profiling: fetched on demand; the wait is a measured swap-in
            t0 = time.perf_counter()
            buf = self.pool.fetch()
            profile.read_seconds += time.perf_counter() - t0
            profile.read_bytes += self.pool.nbytes
        return torch.empty(0, dtype=self.dtype, device=buf.device).set_(
            buf.untyped_storage(), self.offset, self.size, self.stride
        )


class _Replayed:
    __slots__ = ("call", "index")

    def __init__(self, call: _SegmentCall, index: int) -> None:
        self.call, self.index = call, index

    def unpack(self) -> torch.Tensor:
        self.call.run.on_unpack(None)
        return self.call.tensor(self.index)


class _SegmentCall:
    """One call of a segment the plan recomputes: its inputs, RNG and autocast state, and the replay."""

    def __init__(self, run: _ForwardRun, forward, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.run, self.forward, self.module = run, forward, module
        self.n_packs = 0
        self._tensors: list[torch.Tensor | None] | None = None
        self._replayed = 0

        def detach(t: torch.Tensor) -> torch.Tensor:
            return t.detach().requires_grad_(t.requires_grad)

        self.args, self.kwargs = _map_tensors(detach, args), _map_tensors(detach, kwargs)
        self.cpu_rng = torch.get_rng_state()
        device = run.sched.device
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.autocast = [
            (dev, torch.get_autocast_dtype(dev))
            for dev in ("cpu", "cuda")
            if torch.is_autocast_enabled(dev)
        ]
        self.input_pools = run.hold_inputs(_tensors((args, kwargs)))
        self.versions = [t._version for t in _tensors((self.args, self.kwargs))]

    def tensor(self, index: int) -> torch.Tensor:
        if self._tensors is None:
            self._replay()
        t = self._tensors[index]
        if t is None:
            raise RuntimeError(
                "DELTA: a recomputed tensor was unpacked twice (retain_graph / double backward through a "
                "recomputed segment is not supported); use memory_manager='none' for this loss."
            )
        self._tensors[index] = None
        return t

    def _replay(self) -> None:
        if [t._version for t in _tensors((self.args, self.kwargs))] != self.versions:
            raise RuntimeError(
                f"DELTA: an input of {type(self.module).__name__} was modified in place after the call, so its "
                "recomputation would differ; use memory_manager='none' or avoid the in-place op."
            )
        captured: list[torch.Tensor] = []

        def pack(t: torch.Tensor) -> int:
            # Detached: the replay graph's nodes hold these hooks, so a tensor with its grad_fn here would
            # form a cycle through C++ nodes that Python's GC cannot see (a leak of every replayed tensor).
            captured.append(t.detach())
            return len(captured) - 1

        buffers = [(b, b.detach().clone()) for b in self.module.buffers()]
        device = self.run.sched.device
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=[device] if self.cuda_rng is not None else []))
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, device)
            for dev, dtype in self.autocast:
                stack.enter_context(torch.autocast(dev, dtype=dtype))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(saved_tensors_hooks(pack, lambda i: captured[i]))
            self.forward(*self.args, **self.kwargs)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        if len(captured) != self.n_packs:
            raise RuntimeError(
                f"DELTA: replaying segment {type(self.module).__name__} saved {len(captured)} tensors, the "
                f"original forward saved {self.n_packs}. The segment's forward must be a pure function of its "
                "inputs and parameters (no caches, no data-dependent branches on state)."
            )
        ledger = self.run.sched.ledger
        skip = self.run.sched.param_storages | {id(p.untyped_storage()) for p in _tensors(self.args)}
        seen: set[int] = set()
        nbytes = 0
        for t in captured:
            s = t.untyped_storage()
            if id(s) not in skip and id(s) not in seen:
                seen.add(id(s))
                nbytes += s.nbytes()
        ledger.recomputed += nbytes
        ledger.add(nbytes)
        weakref.finalize(self, ledger.sub, nbytes)
        self._tensors = list(captured)


class _ForwardRun:
    """State of one managed forward (several may be in flight: pipeline micro-batches)."""

    def __init__(self, sched: DeltaScheduler) -> None:
        self.sched = sched
        self.signature: tuple | None = None
        self.resolved = False
        self.plan: Plan | None = None
        self.profile: ForwardProfile | None = None
        self.pools: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.pack_count = 0
        self.stack: list[tuple[int, tuple, _SegmentCall | None, SegmentInfo | None]] = []
        self.segment_calls: dict[int, int] = {}
        self.pending_inputs: dict[int, list[SegmentInfo]] = {}
        self.swap_order: list[weakref.ref] = []
        self.cursor = 0
        self.backward_started = False
        self.hooks = saved_tensors_hooks(self.pack, lambda handle: handle.unpack() if not isinstance(handle, torch.Tensor) else handle)

    # -- plan ----------------------------------------------------------------------------------------
    def resolve(self) -> None:
        if self.resolved:
            return
        self.resolved = True
        self.plan = self.sched.plans.get(self.signature)
        if self.plan is None:
            self.profile = ForwardProfile(t_start=self.t_start)

    def decide_swap(self, key: int, nbytes: int) -> bool:
        if self.plan is None:
            return nbytes >= self.sched.min_swap_bytes
        return key in self.plan.swap

    # -- forward side ----------------------------------------------------------------------------------
    def pack(self, t: torch.Tensor) -> Any:
        self.resolve()
        self.pack_count += 1
        key = self.pack_count
        top = self.stack[-1] if self.stack else None
        call = top[2] if top else None
        index = -1
        if call is not None:
            index = call.n_packs
            call.n_packs += 1
        sched = self.sched
        if type(t) is not torch.Tensor or t.layout != torch.strided or t.device != sched.device:
            return t
        storage = t.untyped_storage()
        if id(storage) in sched.param_storages:
            return t
        pool = self.pools.get(storage)
        if pool is not None:
            here = top[1] if top else None
            if pool.info is not None and here != pool.info.segment and here not in pool.info.saved_again_in:
                pool.info.saved_again_in.append(here)  # a replay frees it only if it holds every save
            if not pool.swapped:
                return _Kept(t, pool, self)
            if t._version != pool.version:  # written in place since it was swapped out
                self.timed_write(pool, t)
            return _Swapped(t, pool, self)
        if call is not None:
            return _Replayed(call, index)
        nbytes = storage.nbytes()
        swap = self.decide_swap(key, nbytes)
        pool = _Pool(key, nbytes, sched.ledger, sched.tier_for(t.device) if swap else None)
        self.pools[storage] = pool
        if self.profile is not None:
            pool.info = PoolInfo(key, nbytes, top[1] if top else None,
                                 time.perf_counter() - self.profile.swap_seconds,
                                 releasable=nbytes >= sched.min_swap_bytes)
            self.profile.pools[key] = pool.info
            open_calls = {entry[1] for entry in self.stack}
            for seg in self.pending_inputs.pop(id(storage), ()):
                if seg.key in open_calls:  # an input of a call still running, first saved inside it
                    seg.inner_input_keys.append(key)
        if swap:
            self.timed_write(pool, t)
            if self.plan is not None:
                self.swap_order.append((self.plan.unpack_rank.get(key, -key), weakref.ref(pool)))
            return _Swapped(t, pool, self)
        return _Kept(t, pool, self)

    def timed_write(self, pool: _Pool, t: torch.Tensor) -> None:
        t0 = time.perf_counter()
        pool.write(t)
        if self.profile is not None:
            self.profile.swap_seconds += time.perf_counter() - t0
            self.profile.swap_bytes += pool.nbytes

    def hold_inputs(self, inputs: list[torch.Tensor]) -> list[_Pool]:
        """Keep the inputs of a recomputed segment (dedupe with kept pools, else a new kept pool)."""
        held = []
        for t in inputs:
            if type(t) is not torch.Tensor or t.device != self.sched.device:
                continue
            storage = t.untyped_storage()
            if id(storage) in self.sched.param_storages:
                continue
            pool = self.pools.get(storage)
            if pool is None or pool.swapped:
                pool = _Pool(None, storage.nbytes(), self.sched.ledger, None)
                self.pools[storage] = pool
            held.append(pool)
        return held

    def call_segment(self, index: int, module: nn.Module, forward, args: tuple, kwargs: dict) -> Any:
        self.resolve()
        ordinal = self.segment_calls.get(index, 0)
        self.segment_calls[index] = ordinal + 1
        key = (index, ordinal)
        top = self.stack[-1] if self.stack else None
        call = top[2] if top else None  # inside a call being recomputed, saves belong to that call
        info = None
        if call is None and self.plan is not None and key in self.plan.recompute:
            call = _SegmentCall(self, forward, module, args, kwargs)
        if self.profile is not None:
            info = SegmentInfo(key, parent=top[1] if top else None)
            self.profile.segments[key] = info
            for t in _tensors((args, kwargs)):
                if type(t) is not torch.Tensor:
                    continue
                pool = self.pools.get(t.untyped_storage())
                if pool is not None and pool.key is not None:
                    info.input_keys.append(pool.key)
                else:
                    self.pending_inputs.setdefault(id(t.untyped_storage()), []).append(info)
            self.sched.sync()
            swap0, t0 = self.profile.swap_seconds, time.perf_counter()
        self.stack.append((index, key, call, info))
        try:
            return forward(*args, **kwargs)
        finally:
            self.stack.pop()
            if info is not None:
                self.sched.sync()
                info.seconds = time.perf_counter() - t0 - (self.profile.swap_seconds - swap0)

    def close_forward(self) -> None:
        self.pools = WeakIdKeyDictionary()  # dedupe is per forward; pools now live through their handles
        self.pending_inputs.clear()
        self.swap_order.sort(key=lambda item: item[0])
        self.swap_order = [ref for _, ref in self.swap_order]
        if self.profile is not None:
            self.profile.t_forward_end = time.perf_counter()

    # -- backward side ---------------------------------------------------------------------------------
    def on_unpack(self, pool: _Pool | None) -> None:
        now = time.perf_counter()
        if not self.backward_started:
            self.backward_started = True
            self.sched.backward_started(self)
            if self.profile is not None:
                self.profile.t_backward_start = now
        if self.profile is not None:
            self.profile.t_backward_end = now
            if pool is not None and pool.info is not None:
                if pool.info.t_unpack is None:
                    pool.info.t_unpack = now
                    self.profile.unpack_order.append(pool.key)
                pool.info.t_last_unpack = now
        if pool is not None:
            pool.consumed = True
        if self.plan is not None:
            self.prefetch()

    def prefetch(self) -> None:
        """Start swap-ins ahead of use, in recorded unpack order, while the allowance has room."""
        sched = self.sched
        limit = sched.forward_allowance - self.plan.reserve
        ahead = 0
        i = self.cursor
        while i < len(self.swap_order) and ahead < sched.prefetch_depth:
            pool = self.swap_order[i]()
            if pool is None or pool.consumed:
                if i == self.cursor:
                    self.cursor += 1
                i += 1
                continue
            if pool.state.buf is None and pool.state.read is None:
                if sched.ledger.resident + pool.nbytes > limit:
                    break
                pool.prefetch()
            ahead += 1
            i += 1


class DeltaScheduler:
    """Dynamic per-storage swap-or-recompute under a memory budget (DELTA, Tang et al. 2022).

    Args:
        module: the module whose forward is managed (its repeated blocks become recompute segments).
        memory_budget: bytes per device, or a string like ``"20GiB"``. It covers parameters, their
            gradients and saved activations: the activation allowance is ``budget - 2 * parameter bytes``.
        profile_steps: steps profiled per input signature before decisions are planned.
        swap_dir: directory of the swap file on CPU-only runs (default: the system temp dir).
        swap_bandwidth: override the measured swap bandwidth (bytes/s), e.g. to study the director.
        min_swap_bytes: storages smaller than this are always kept.
        prefetch_depth: swapped storages fetched ahead of use in backward.
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
        params = {id(_local(p).untyped_storage()): _local(p).untyped_storage().nbytes() for p in module.parameters()}
        first = next(module.parameters(), None)
        self.device = _local(first).device if first is not None else torch.device("cpu")
        self.ledger = MemoryLedger(budget, sum(params.values()), self.device)
        self.param_storages: set[int] = set()
        self.plans: dict[tuple | None, Plan] = {}
        self.profiles: dict[tuple | None, list[ForwardProfile]] = {}
        self.bandwidth: tuple[float, float] | None = None
        self.in_flight = 1
        self._tiers: dict[torch.device, SwapTier] = {}
        self._runs: list[_ForwardRun] = []
        self._forwards_since_backward = 0
        self._active: list[_ForwardRun] = []
        self._checked = False
        self.segments = segment_tree(module)
        self._originals: list[tuple[nn.Module, Any]] = []
        for index, (_, seg) in enumerate(self.segments):
            self._wrap(index, seg)
        self._pre_hook = module.register_forward_pre_hook(self._on_module_call, with_kwargs=True)
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
        if profiled and not self._checked:
            self._checked = True
            self._check_budget(profiled[-1].profile)
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

    def close(self) -> None:
        """Undo every hook and wrapper and free the swap tiers."""
        for seg, original in self._originals:
            if original is None:
                del seg.forward
            else:
                seg.forward = original
        self._originals = []
        self._pre_hook.remove()
        for tier in self._tiers.values():
            tier.close()
        self._tiers = {}

    # -- internals -----------------------------------------------------------------------------------
    def _wrap(self, index: int, seg: nn.Module) -> None:
        original = seg.__dict__.get("forward")
        bound = seg.forward

        def managed(*args: Any, **kwargs: Any) -> Any:
            run = self._active[-1] if self._active else None
            if run is None or not torch.is_grad_enabled() or (run.stack and run.stack[-1][0] == index):
                return bound(*args, **kwargs)
            return run.call_segment(index, seg, bound, args, kwargs)

        seg.forward = managed
        self._originals.append((seg, original))

    def _on_module_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._active and self._active[-1].signature is None and not self._active[-1].resolved:
            self._active[-1].signature = _signature(args, kwargs)

    def _auto_open(self) -> None:
        if torch.is_grad_enabled():
            self._open()

    def _auto_close(self) -> None:
        if self._active:
            self._close(self._active[-1])

    def _open(self) -> _ForwardRun:
        if not self._active:
            tensors = list(self.module.parameters()) + list(self.module.buffers())
            self.param_storages = {id(_local(t).untyped_storage()) for t in tensors}
        run = _ForwardRun(self)
        run.t_start = time.perf_counter()
        self._active.append(run)
        self._runs.append(run)
        self._forwards_since_backward += 1
        run.hooks.__enter__()
        return run

    def _close(self, run: _ForwardRun) -> None:
        run.hooks.__exit__(None, None, None)
        self._active.remove(run)
        self.sync()
        run.close_forward()

    def backward_started(self, run: _ForwardRun) -> None:
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
                f"memory_budget={self.ledger.budget_bytes} bytes ({self.ledger.budget_bytes / 2**30:.3f} GiB) is "
                f"below the minimum of {minimum} bytes ({minimum / 2**30:.3f} GiB): parameters and gradients "
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
