"""One managed forward and its backward: pack decisions, profiling, and prefetch.

Every saved tensor of the forward comes through :meth:`ForwardRun.pack`. Parameters, buffers, tensor
subclasses and tensors off the managed device pass through untouched; a tensor saved inside a recomputed
segment call becomes that call's; any other joins its alias pool, kept or swapped out as the plan says (or,
while profiling, swapped whenever it is above ``min_swap_bytes``, which is memory-safe whatever the
budget). In backward, swapped pools are prefetched in the unpack order recorded while profiling, as far
ahead as the allowance permits.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.weak import WeakIdKeyDictionary

from lightning_merak._compat import version_counter
from lightning_merak.memory.planner import Plan
from lightning_merak.memory.pools import Kept, Pool, Swapped
from lightning_merak.memory.profiler import ForwardProfile, PoolInfo, SegmentInfo, SegmentKey
from lightning_merak.memory.replay import Replayed, ReplayScheduler, SegmentCall, tensors_in
from lightning_merak.memory.swap import SwapTier


class Scheduler(ReplayScheduler, Protocol):
    """What a forward run asks of the scheduler that opened it (``scheduler.DeltaScheduler``; a protocol
    keeps this module below that one). Read live: plans are added and the allowance changes as it runs."""

    plans: Mapping[tuple | None, Plan]  # a ShapeCache: bounded, least recently used dropped first
    min_swap_bytes: int
    prefetch_depth: int

    @property
    def forward_allowance(self) -> int: ...

    def tier_for(self, device: torch.device) -> SwapTier: ...

    def sync(self) -> None: ...

    def backward_started(self, run: ForwardRun) -> None: ...


@dataclass(frozen=True)
class Frame:
    """A segment call still running in this forward: the saves made now belong to it."""

    index: int  # the segment's position in the scheduler's segment tree
    key: SegmentKey  # (index, call ordinal within the forward)
    call: SegmentCall | None  # the recomputed call its saves go to: its own or an enclosing one's
    info: SegmentInfo | None  # what is measured of the call, while profiling


class ForwardRun:
    """State of one managed forward (several may be in flight: pipeline micro-batches)."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.t_start = 0.0  # set by the scheduler as it opens the run
        self.signature: tuple | None = None
        self.resolved = False
        self.plan: Plan | None = None
        self.profile: ForwardProfile | None = None
        self.pools: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.pack_count = 0
        self.stack: list[Frame] = []
        self.segment_calls: dict[int, int] = {}
        self.pending_inputs: dict[int, list[SegmentInfo]] = {}
        self.swap_order: list[weakref.ref] = []
        self.cursor = 0
        self.backward_started = False
        self.hooks = saved_tensors_hooks(self.pack, lambda handle: handle.unpack() if not isinstance(handle, torch.Tensor) else handle)

    @property
    def top(self) -> Frame | None:
        """The innermost segment call still running, if any."""
        return self.stack[-1] if self.stack else None

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
        top = self.top
        call = top.call if top else None
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
            here = top.key if top else None
            if pool.info is not None and here != pool.info.segment and here not in pool.info.saved_again_in:
                pool.info.saved_again_in.append(here)  # a replay frees it only if it holds every save
            if not pool.swapped:
                return Kept(t, pool, self)
            if version_counter(t) != pool.version:  # written in place since it was swapped out
                self.timed_write(pool, t)
            return Swapped(t, pool, self)
        if call is not None:
            return Replayed(call, index)
        nbytes = storage.nbytes()
        swap = self.decide_swap(key, nbytes)
        pool = Pool(key, nbytes, sched.ledger, sched.tier_for(t.device) if swap else None)
        self.pools[storage] = pool
        if self.profile is not None:
            pool.info = PoolInfo(key, nbytes, top.key if top else None,
                                 time.perf_counter() - self.profile.swap_seconds,
                                 releasable=nbytes >= sched.min_swap_bytes)
            self.profile.pools[key] = pool.info
            open_calls = {frame.key for frame in self.stack}
            for seg in self.pending_inputs.pop(id(storage), ()):
                if seg.key in open_calls:  # an input of a call still running, first saved inside it
                    seg.inner_input_keys.append(key)
        if swap:
            self.timed_write(pool, t)
            if self.plan is not None:
                self.swap_order.append((self.plan.unpack_rank.get(key, -key), weakref.ref(pool)))
            return Swapped(t, pool, self)
        return Kept(t, pool, self)

    def timed_write(self, pool: Pool, t: torch.Tensor) -> None:
        t0 = time.perf_counter()
        pool.write(t)
        if self.profile is not None:
            self.profile.swap_seconds += time.perf_counter() - t0
            self.profile.swap_bytes += pool.nbytes

    def hold_inputs(self, inputs: list[torch.Tensor]) -> list[Pool]:
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
                pool = Pool(None, storage.nbytes(), self.sched.ledger, None)
                self.pools[storage] = pool
            held.append(pool)
        return held

    def call_segment(self, index: int, module: nn.Module, forward, args: tuple, kwargs: dict) -> Any:
        self.resolve()
        ordinal = self.segment_calls.get(index, 0)
        self.segment_calls[index] = ordinal + 1
        key = (index, ordinal)
        top = self.top
        call = top.call if top else None  # inside a call being recomputed, saves belong to that call
        info = None
        if call is None and self.plan is not None and key in self.plan.recompute:
            call = SegmentCall(self, forward, module, args, kwargs)
        if self.profile is not None:
            info = SegmentInfo(key, parent=top.key if top else None)
            self.profile.segments[key] = info
            for t in tensors_in((args, kwargs)):
                if type(t) is not torch.Tensor:
                    continue
                pool = self.pools.get(t.untyped_storage())
                if pool is not None and pool.key is not None:
                    info.input_keys.append(pool.key)
                else:
                    self.pending_inputs.setdefault(id(t.untyped_storage()), []).append(info)
            self.sched.sync()
            swap0, t0 = self.profile.swap_seconds, time.perf_counter()
        self.stack.append(Frame(index, key, call, info))
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
    def on_unpack(self, pool: Pool | None) -> None:
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
