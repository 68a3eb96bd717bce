"""Alias pools and the handles autograd holds in place of a saved tensor.

Saved tensors are grouped by storage identity into alias pools (DTR), never by ``data_ptr``: a view and its
base are one pool, counted once. A pool is kept (the handle holds the tensor) or swapped out to a
:class:`~lightning_merak.memory.swap.SwapTier` (the handle holds only the view's geometry and rebuilds the
view over the swapped-in storage). Replayed tensors have their own handle, in ``replay.py``.
"""

from __future__ import annotations

import time
import weakref
from typing import Protocol

import torch

from lightning_merak._compat import version_counter
from lightning_merak.memory.ledger import MemoryLedger
from lightning_merak.memory.profiler import ForwardProfile, PoolInfo
from lightning_merak.memory.swap import SwapTier, storage_bytes


class Run(Protocol):
    """What a handle asks of the forward run that made it (``run.ForwardRun``; a protocol keeps this module
    below that one): each unpack is reported, and while profiling, swap-ins are timed into its profile."""

    profile: ForwardProfile | None

    def on_unpack(self, pool: Pool | None) -> None: ...


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


class Pool:
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
        self.version = version_counter(t)

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


class Kept:
    """A saved tensor of a kept pool: the tensor itself."""

    __slots__ = ("tensor", "pool", "run")

    def __init__(self, tensor: torch.Tensor, pool: Pool, run: Run) -> None:
        self.tensor, self.pool, self.run = tensor, pool, run

    def unpack(self) -> torch.Tensor:
        self.run.on_unpack(self.pool)
        return self.tensor


class Swapped:
    """A saved tensor of a swapped pool: its view geometry, rebuilt over the storage once swapped in."""

    __slots__ = ("pool", "run", "dtype", "size", "stride", "offset")

    def __init__(self, t: torch.Tensor, pool: Pool, run: Run) -> None:
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
