"""Local-only materialisation: this rank's tensors get memory on its device, nobody else's.

A model built in ``configure_model()`` or under ``trainer.init_module(empty_init=True)`` lives on the meta device
until it is cut; an eagerly built one lives on the CPU. After the cut the pruned module holds only this rank's
parameters and buffers, and ``materialize`` gives each meta tensor real memory on the device and the init of
the module that owns it:

- the tensors of the checkpoint folder the model came from (``from_pretrained`` in ``configure_model``, see
  ``pretrained``), read one by one: only this rank's;
- else a transformers model's own ``_init_weights`` (rotary tables and norms included), else the module's
  ``reset_parameters()``; anything neither covers is an error naming the module, never uninitialised memory
  (new tensors are filled with NaN first, so "not written" can be seen);
- the generators are seeded per module *name* before its init, so every rank holding a copy of a module (data
  parallel replicas, tensor-parallel ranks before sharding) computes the same values as one process would;
- a parameter shared by two modules (tied weights) is initialised once, by the first module in registration
  order, as in one process; copies of a tie on other pipeline ranks are made equal by the build recipe.

CPU tensors are moved, one at a time, so the device never holds more than this rank's part. Under tensor
parallelism the module was sharded on meta first: a sharded parameter (a DTensor) gets memory for its local shard
only, read as a slice from the checkpoint or initialised directly into the shard (``tensor_parallel.shards``).
Temporaries are freed as they go, and the heap pages they used are handed back at the end.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_merak._compat import (
    buffer_slots,
    hf_init_weights,
    local_shard,
    parameter_slots,
    release_freed_host_memory,
)
from lightning_merak.pretrained import checkpoint_of
from lightning_merak.rng import mix
from lightning_merak.tensor_parallel.shards import empty_shard, init_local_shards


class MaterializationError(RuntimeError):
    """A meta-built module cannot be given real values; the message names the module and what to do."""


@dataclass
class Materialized:
    """What ``materialize`` did on this rank."""

    initialized_bytes: int = 0  # meta tensors given memory and their module's init (or the checkpoint's values)
    moved_bytes: int = 0  # real tensors moved to the device
    whole_bytes: int = 0  # most bytes of whole TP-sharded tensors held at once as temporaries (0: all direct)
    read_keys: list[str] = field(default_factory=list)  # tensors read from a pretrained checkpoint folder

    @property
    def total_bytes(self) -> int:
        return self.initialized_bytes + self.moved_bytes


def has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in _tensors(module))


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in list(module.parameters()) + list(module.buffers()) if t is not None]


def materialize(module: nn.Module, device: torch.device, seed: int, *, skip: nn.Module | None = None,
                prefix: str = "") -> Materialized:
    """Give ``module``'s registered meta tensors memory on ``device`` and their own init; move the rest there.

    ``skip``: a submodule left as it is (the pipelined module, materialised after the cut). ``prefix``: the name
    of ``module`` inside the LightningModule, so seeds follow full names whatever the root.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # seeding per module must not shift the run's randomness
        done = _materialize(module, device, seed, skip, prefix)
    release_freed_host_memory()
    return done


def _materialize(module: nn.Module, device: torch.device, seed: int, skip: nn.Module | None,
                 prefix: str) -> Materialized:
    done = Materialized()
    new: dict[int, torch.Tensor] = {}  # id(old tensor) -> its replacement: a tie keeps one object
    owners = _hf_owners(module, prefix)
    skipped = {id(m) for m in skip.modules()} if skip is not None else set()
    initialized: set[int] = set()
    for name, sub in module.named_modules(prefix=prefix):
        if id(sub) in skipped:
            continue
        fresh = []
        for slots in (parameter_slots(sub), buffer_slots(sub)):
            for key, t in list(slots.items()):
                if t is None:
                    continue
                if id(t) in new:
                    slots[key] = new[id(t)]
                    continue
                if t.is_meta:
                    replacement = _empty_like(t, device)
                    fresh.append((key, replacement))
                    done.initialized_bytes += _local_bytes(replacement)
                elif t.device != device:
                    replacement = _moved(t, device)
                    done.moved_bytes += _local_bytes(replacement)
                else:
                    continue
                new[id(t)] = slots[key] = replacement
        if fresh:
            read, whole = _initialize(name, sub, fresh, owners, seed, device, initialized)
            done.read_keys += read
            done.whole_bytes = max(done.whole_bytes, whole)
    return done


def _local_bytes(t: torch.Tensor) -> int:
    local = local_shard(t)
    return local.numel() * local.element_size()


def _unwritten(value: torch.Tensor) -> None:
    value.fill_(float("nan") if value.is_floating_point() else _UNSET_INT)


def _empty_like(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(t, DTensor):  # sharded on meta: memory for this rank's shard only
        return empty_shard(t, device, _unwritten)
    value = torch.empty(t.shape, dtype=t.dtype, device=device)
    _unwritten(value)
    return nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value


def _is_unwritten(t: torch.Tensor) -> bool:
    """Whether any element still holds the "not written" mark; a NaN sum is confirmed element-wise (inf - inf),
    so no temporary the size of the tensor is made for the common case."""
    local = local_shard(t)
    if local.is_floating_point():
        return bool(torch.isnan(local.sum())) and bool(torch.isnan(local).any())
    return bool((local == _UNSET_INT).any())


def _moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    value = t.detach().to(device)
    return nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value


_UNSET_INT = -(2**31) + 7  # an integer buffer no init writes (position ids, counters are small and positive)


@dataclass(frozen=True)
class _Owner:
    model: nn.Module | None  # the innermost transformers PreTrainedModel around a module: its init applies
    source: nn.Module | None  # the model built by ``from_pretrained`` around it: its folder is read
    source_name: str


def _hf_owners(module: nn.Module, prefix: str) -> dict[int, _Owner]:
    """id(submodule) -> the transformers models around it (see ``_Owner``)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is a dependency, but a module can be initialised without it
        return {}
    owners: dict[int, _Owner] = {}

    def walk(m: nn.Module, name: str, owner: _Owner) -> None:
        if isinstance(m, PreTrainedModel):
            source = (m, name) if checkpoint_of(m) is not None else (owner.source, owner.source_name)
            owner = _Owner(m, *source)
        owners[id(m)] = owner
        for child_name, child in m.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name, owner)

    walk(module, prefix, _Owner(None, None, ""))
    return owners


def _initialize(name: str, sub: nn.Module, fresh: list[tuple[str, torch.Tensor]], owners: dict[int, _Owner],
                seed: int, device: torch.device, initialized: set[int]) -> tuple[list[str], int]:
    """Read ``sub``'s tensors from its model's checkpoint folder, if it came from one; run its own init under a
    seed of its name for the rest (tensor-parallel shards: ``init_local_shards``). Values of tensors another
    module already initialised (a tie) are kept; every fresh tensor must have been written. Returns the
    checkpoint keys read and the bytes of the largest whole temporary made for a shard."""
    found = owners.get(id(sub), _Owner(None, None, ""))
    owner, checkpoint, base = found.model, checkpoint_of(found.source), found.source_name
    relative = name[len(base) + 1:] if base and name.startswith(base + ".") else ("" if name == base else name)
    read: list[str] = []
    whole = 0
    with torch.no_grad():
        if checkpoint is not None:
            for key, t in fresh:
                file_key = checkpoint.key_for(f"{relative}.{key}" if relative else key, found.source.base_model_prefix)
                if file_key is not None:
                    local_shard(t).copy_(checkpoint.read(file_key, t))
                    read.append(file_key)
                    initialized.add(id(t))
        if len(read) < len(fresh):
            kept = [(t, local_shard(t).clone()) for t in _own_tensors(sub) if id(t) in initialized]
            module_seed = mix(seed, zlib.crc32(name.encode()))
            _seed(module_seed, device)

            def init() -> None:
                if owner is not None:
                    hf_init_weights(owner, sub)
                elif callable(getattr(sub, "reset_parameters", None)):
                    sub.reset_parameters()

            whole = init_local_shards(sub, init, lambda: _seed(module_seed, device), device, _unwritten,
                                      _is_unwritten)
            for t, value in kept:
                local_shard(t).copy_(value)
    for key, t in fresh:
        if _is_unwritten(t):
            how = (f"its transformers model's _init_weights ({type(owner).__name__}) does not set it"
                   if owner is not None else "it has no reset_parameters()")
            raise MaterializationError(
                f"`{name}` ({type(sub).__name__}) was built on the meta device, but `{key}` got no values: {how}. "
                "Give the module a reset_parameters() that sets every parameter and buffer, or build that part "
                "of the model outside configure_model()/init_module(empty_init=True) (then it is moved, not "
                "initialised)."
            )
        initialized.add(id(t))
    return read, whole


def _own_tensors(sub: nn.Module) -> list[torch.Tensor]:
    return [t for t in list(parameter_slots(sub).values()) + list(buffer_slots(sub).values()) if t is not None]


def _seed(value: int, device: torch.device) -> None:
    torch.manual_seed(value)
    if device.type == "cuda":
        torch.cuda.manual_seed(value)
