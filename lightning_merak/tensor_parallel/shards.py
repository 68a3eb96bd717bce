"""This rank's slice of a tensor-parallel parameter, given its values without the whole tensor on this rank.

TP sharding runs on the meta device (``parallelize.build_engine``), so a sharded parameter arrives here as a
DTensor whose local shard has no memory yet. Its slice of the whole tensor is a set of indices along one dimension
(``ShardIndex``: one run for ``Shard``, one run per fused part for the per-head strided shards of q|k|v), worked out
by DTensor's own splitting of an index vector, so uneven and strided layouts come out exactly as DTensor lays
them. Two ways to fill it:

- **from a checkpoint** (``ShardIndex.read``): only those indices are read, with safetensors' ``get_slice``;
- **by the module's own init** (``init_local_shards``): during the init each sharded slot holds a whole-shape
  stand-in (one element broadcast to the whole shape: not meta, so an init that skips meta tensors still runs)
  and a dispatch mode carries every op on it over to the local shard. Fills and scalar elementwise ops (``zero_``, ``fill_``, ``mul_``, ``clamp_``, ``erfinv_`` ...) apply to the shard as they are.
  ``normal_`` / ``uniform_`` draw the whole tensor's random stream from the same generator, a bounded chunk at a
  time, and keep this rank's elements: on the CPU generator (mt19937) torch fills a contiguous tensor
  position by position (``normal_`` in blocks of 16 with a redrawn tail, which the chunking respects), so the
  shard holds exactly the elements one process would have drawn into the whole tensor, and the generator ends in
  the same state (checked in ``tests/large/test_tp_shards.py``).
  Where that cannot hold, the whole parameter is made as a temporary, initialised as one process would, sliced
  and freed, one module at a time: on CUDA (the Philox stream of a kernel depends on the tensor's size) and for an
  init that reads the tensor, takes a view of part of it, or copies a computed tensor into it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from lightning_merak._compat import (
    TorchDispatchMode,
    _StridedShard,
    local_shard,
    parameter_slots,
    storage_key,
)

# elements drawn per chunk of a random stream (a multiple of 16, see the module docstring): 64 KiB of fp32
STREAM_CHUNK = 1 << 14

aten = torch.ops.aten
_RANDOM = {aten.normal_, aten.uniform_}
_ELEMENTWISE = {aten.fill_, aten.zero_, aten.mul_, aten.div_, aten.add_, aten.sub_, aten.clamp_, aten.clamp_min_,
                aten.clamp_max_, aten.erfinv_, aten.exp_, aten.neg_, aten.abs_, aten.sqrt_}
_ALIASES = {aten.detach, aten.alias, aten.view, aten._unsafe_view}


@dataclass(frozen=True)
class ShardIndex:
    """Where a local shard lies in the whole tensor: the indices ``runs`` (half-open, increasing) along ``dim``."""

    shape: tuple[int, ...]
    dim: int
    runs: tuple[tuple[int, int], ...]

    def take(self, whole: torch.Tensor) -> torch.Tensor:
        parts = [whole.narrow(self.dim, lo, hi - lo) for lo, hi in self.runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts, self.dim)

    def read(self, safetensors_slice) -> torch.Tensor:
        """The shard from a safetensors ``get_slice`` handle: only its runs are read from the file."""
        lead = (slice(None),) * self.dim
        parts = [safetensors_slice[(*lead, slice(lo, hi))] for lo, hi in self.runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts, self.dim)

    def flat_intervals(self) -> Iterator[tuple[int, int]]:
        """The shard's elements as increasing intervals of the whole tensor's flat (row-major) positions; in this
        order they are the shard's own flat order."""
        outer = 1
        for size in self.shape[:self.dim]:
            outer *= size
        inner = 1
        for size in self.shape[self.dim + 1:]:
            inner *= size
        width = self.shape[self.dim]
        for a in range(outer):
            for lo, hi in self.runs:
                yield (a * width + lo) * inner, (a * width + hi) * inner


def shard_index(p: torch.Tensor) -> ShardIndex | None:
    """``p``'s slice of its whole tensor; None for a replicated (or plain) tensor, whose local is the whole."""
    if not isinstance(p, DTensor):
        return None
    sharded = [pl for pl in p.placements if not isinstance(pl, Replicate)]
    if not sharded:
        return None
    if p.device_mesh.ndim != 1 or not isinstance(sharded[0], (Shard, _StridedShard)):
        raise NotImplementedError(f"materialising a DTensor laid out as {p.placements} over a {p.device_mesh.ndim}-D "
                                  "mesh; only a 1-D tensor-parallel mesh is supported")
    dim = sharded[0].dim
    positions = torch.arange(p.shape[dim]).view([p.shape[dim] if d == dim else 1 for d in range(p.dim())])
    mine = distribute_tensor(positions, p.device_mesh, p.placements, src_data_rank=None).to_local().flatten()
    runs: list[list[int]] = []
    for i in mine.tolist():
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        elif runs and i < runs[-1][1]:
            raise NotImplementedError(f"a DTensor shard whose indices are not increasing ({p.placements})")
        else:
            runs.append([i, i + 1])
    return ShardIndex(tuple(p.shape), dim, tuple((lo, hi) for lo, hi in runs))


def empty_shard(p: DTensor, device: torch.device, fill: Callable[[torch.Tensor], None]) -> nn.Parameter | DTensor:
    """A DTensor like the meta ``p`` whose local shard has memory on ``device`` (filled by ``fill``)."""
    meta_local = p.to_local()
    local = torch.empty(meta_local.shape, dtype=p.dtype, device=device)
    fill(local)
    value = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return nn.Parameter(value, requires_grad=p.requires_grad) if isinstance(p, nn.Parameter) else value


class _NeedsWhole(Exception):
    """The init did something to a stand-in that the shard alone cannot reproduce."""


@dataclass
class _Target:
    standin: torch.Tensor  # the whole shape over one element: what the init sees
    local: torch.Tensor  # this rank's shard, real
    index: ShardIndex

    def same_view(self, t: torch.Tensor) -> bool:
        s = self.standin
        return t.shape == s.shape and t.stride() == s.stride() and t.storage_offset() == s.storage_offset()

    def draw(self, func, rest: tuple, kwargs: dict) -> None:
        """The whole tensor's random stream, one bounded chunk at a time; this shard's elements kept."""
        numel, flat = self.standin.numel(), self.local.view(-1)
        buffer = torch.empty(min(numel, STREAM_CHUNK + 15), dtype=self.local.dtype, device=self.local.device)
        intervals = self.index.flat_intervals()
        current, written, start = next(intervals, None), 0, 0
        while start < numel:
            size = STREAM_CHUNK if numel - start >= STREAM_CHUNK + 16 else numel - start  # the last chunk >= 16
            piece = buffer[:size]
            func(piece, *rest, **kwargs)
            end = start + size
            while current is not None and current[0] < end:
                lo, hi = max(current[0], start), min(current[1], end)
                if lo < hi:
                    flat[written:written + hi - lo].copy_(piece[lo - start:hi - start])
                    written += hi - lo
                if current[1] > end:
                    break
                current = next(intervals, None)
            start = end


def _tensors(args, kwargs) -> list[torch.Tensor]:
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [x for x in a if isinstance(x, torch.Tensor)]
    return out


class _ShardInitMode(TorchDispatchMode):
    """Carries the init's ops on the whole-shape stand-ins over to the local shards (see the module docstring)."""

    def __init__(self, targets: dict[int, _Target]) -> None:
        super().__init__()
        self.targets = targets

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        hits = [t for t in _tensors(args, kwargs)
                if not isinstance(t, DTensor) and t.layout == torch.strided and storage_key(t) in self.targets]
        if not hits:
            return func(*args, **kwargs)
        target = self.targets[storage_key(hits[0])]
        packet = func.overloadpacket
        first = args[0] if args else None
        on_self = isinstance(first, torch.Tensor) and first is hits[0] and len(hits) == 1 and target.same_view(first)
        if not on_self:
            raise _NeedsWhole(f"{func} reads the tensor")
        if packet in _ALIASES:
            out = func(*args, **kwargs)
            if not target.same_view(out):
                raise _NeedsWhole(f"{func} takes a view of part of the tensor")
            return out
        others = _tensors(args[1:], kwargs)
        if packet in _RANDOM:
            target.draw(func, args[1:], kwargs)
        elif packet is aten.copy_ and others and others[0].shape == target.standin.shape and not others[0].is_meta:
            target.local.copy_(target.index.take(others[0]))
        elif packet in _ELEMENTWISE and all(t.dim() == 0 for t in others):
            func(target.local, *args[1:], **kwargs)
        else:
            raise _NeedsWhole(f"{func} is not elementwise")
        return first


def init_local_shards(module: nn.Module, init: Callable[[], None], reseed: Callable[[], None],
                      device: torch.device, fill: Callable[[torch.Tensor], None],
                      unwritten: Callable[[torch.Tensor], bool]) -> int:
    """Run ``module``'s own ``init`` so that its tensor-parallel parameters get exactly the values of their slice of
    the one-process init, without the whole tensors where possible. Returns the bytes of the whole tensors made
    as temporaries, all of this module's sharded ones at once (0 when every shard was initialised directly).

    ``reseed`` puts the generators back to where ``init`` must start (used when the direct way gives up);
    ``fill`` marks a whole temporary as "not written" and ``unwritten`` finds the mark (the caller's check for
    tensors no init covers): a shard the direct way left unwritten is made the whole way instead.
    """
    slots = parameter_slots(module)
    sharded = {key: (p, shard_index(p)) for key, p in slots.items() if isinstance(p, DTensor)}
    if not sharded:
        init()
        return 0
    if device.type == "cpu":
        targets, stand_ins = {}, {}
        for key, (p, index) in sharded.items():
            if index is None:  # replicated: the local is the whole tensor; the init runs on it as in one process
                stand_ins[key] = nn.Parameter(local_shard(p), requires_grad=p.requires_grad)
                continue
            standin = nn.Parameter(torch.empty((), dtype=p.dtype).expand(p.shape), requires_grad=p.requires_grad)
            targets[storage_key(standin)] = _Target(standin, local_shard(p), index)
            stand_ins[key] = standin
        try:
            with _swapped(slots, stand_ins), _ShardInitMode(targets):
                init()
            if not any(unwritten(target.local) for target in targets.values()):
                return 0
        except _NeedsWhole:
            pass
        reseed()  # the whole way, from the same generator state
    wholes = {}
    for key, (p, index) in sharded.items():
        if index is None:
            whole = local_shard(p)
        else:
            whole = torch.empty(p.shape, dtype=p.dtype, device=device)
            fill(whole)
        wholes[key] = nn.Parameter(whole, requires_grad=p.requires_grad)
    with _swapped(slots, wholes):
        init()
    made = 0
    for key, (p, index) in sharded.items():
        if index is not None:
            local_shard(p).copy_(index.take(wholes[key].data))
            made += wholes[key].numel() * wholes[key].element_size()
    return made


class _swapped:
    """Parameter slots holding other tensors for the duration of a block, put back afterwards."""

    def __init__(self, slots: dict, replacements: dict) -> None:
        self.slots, self.replacements, self.saved = slots, replacements, {}

    def __enter__(self) -> None:
        for key, value in self.replacements.items():
            self.saved[key] = self.slots[key]
            self.slots[key] = value

    def __exit__(self, *exc) -> None:
        self.slots.update(self.saved)
