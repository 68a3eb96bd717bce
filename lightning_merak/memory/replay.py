"""Segment replay: recompute one call of a segment in backward, bitwise as it ran in forward.

In a segment call the plan recomputes, each saved tensor (nested calls included) is replaced by a
(segment call, index) handle and dropped; the call's inputs are kept, with its RNG and autocast state. The
first unpack in backward replays the call under capturing hooks and hands out the regenerated tensors, so
dropout masks and gradients are bitwise those of the unmanaged run. Buffers touched by the replay
(BatchNorm statistics) are restored afterwards; an input modified in place since the call is an error.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Protocol

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from lightning_merak._compat import version_counter
from lightning_merak.memory.ledger import MemoryLedger
from lightning_merak.memory.pools import Pool, Run


def map_tensors(fn, value: Any) -> Any:
    """``fn`` applied to every tensor in nested tuples, lists and dicts (a call's arguments)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(fn, v) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(fn, v) for k, v in value.items()}
    return value


def tensors_in(value: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    map_tensors(lambda t: out.append(t) or t, value)
    return out


class ReplayScheduler(Protocol):
    """The scheduler state a replay reads when it runs, not when the call was made (a later forward
    refreshes ``param_storages``)."""

    device: torch.device
    ledger: MemoryLedger
    param_storages: set[int]


class ReplayRun(Run, Protocol):
    """What a segment call asks of the forward run that made it (``run.ForwardRun``)."""

    sched: ReplayScheduler

    def hold_inputs(self, inputs: list[torch.Tensor]) -> list[Pool]: ...


class Replayed:
    """A saved tensor of a recomputed segment call: the call and the tensor's index in its saves."""

    __slots__ = ("call", "index")

    def __init__(self, call: SegmentCall, index: int) -> None:
        self.call, self.index = call, index

    def unpack(self) -> torch.Tensor:
        self.call.run.on_unpack(None)
        return self.call.tensor(self.index)


class SegmentCall:
    """One call of a segment the plan recomputes: its inputs, RNG and autocast state, and the replay."""

    def __init__(self, run: ReplayRun, forward, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.run, self.forward, self.module = run, forward, module
        self.n_packs = 0
        self._tensors: list[torch.Tensor | None] | None = None
        self._replayed = 0

        def detach(t: torch.Tensor) -> torch.Tensor:
            return t.detach().requires_grad_(t.requires_grad)

        self.args, self.kwargs = map_tensors(detach, args), map_tensors(detach, kwargs)
        self.cpu_rng = torch.get_rng_state()
        device = run.sched.device
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.autocast = [
            (dev, torch.get_autocast_dtype(dev))
            for dev in ("cpu", "cuda")
            if torch.is_autocast_enabled(dev)
        ]
        self.input_pools = run.hold_inputs(tensors_in((args, kwargs)))
        self.versions = [version_counter(t) for t in tensors_in((self.args, self.kwargs))]

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
        if [version_counter(t) for t in tensors_in((self.args, self.kwargs))] != self.versions:
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
        skip = self.run.sched.param_storages | {id(p.untyped_storage()) for p in tensors_in(self.args)}
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
