"""ZeRO stages 1 and 2 over the data-parallel group, by whole-parameter ownership (Rajbhandari et al., "ZeRO:
Memory Optimizations Toward Training Trillion Parameter Models", SC 2020; DeepSpeed's and Merak's stage 1/2).

Each dp rank *owns* a share of every optimizer's parameters, whole tensors balanced by bytes
(``ParameterOwnership``). Stage 1 all-reduces the gradients at the data-parallel sync point, as DDP does, so
``on_before_optimizer_step`` hooks and clipping see every averaged gradient; stage 2 reduce-scatters them (half
the traffic of an all-reduce on NCCL; see ``_reduce_to_owners`` for gloo), so from the sync on a rank holds the
gradients it owns and no others. Either way the user's own optimizer steps only the owned parameters: its ``step`` frees the other gradients just before
the update (torch's optimizers skip a parameter whose ``grad`` is None), so its state exists only for the owned
ones; afterwards the owners' new values are all-gathered. ``ReplicatedOptimizer`` is stage 0 (every replica
steps everything) behind the same calls, so the strategy's hooks never branch on the stage.

The optimizer object stays the one ``configure_optimizers`` built, param groups and all: Lightning's
LightningOptimizer, LR schedulers and the name-keyed checkpoints (``checkpoint.py``) see what they see without
ZeRO. Its ``state_dict()`` lists owned state and an empty entry for every other parameter, so each dp rank
writes exactly its owned entries into a sharded checkpoint and, at any other dp size, reads exactly the ones it
owns then. Ownership is computed from full (global) tensor sizes, so every tensor-parallel rank of a replica
agrees on it, and from each pipeline stage's own parameters.

The sync point sits after the last backward of an accumulation window, so gradients are whole during backward:
what stage 2 bounds is the gradient memory from the sync through the optimizer step. (DeepSpeed's stage 2
reduces buckets during backward; here that would take per-parameter gradient hooks in the engines.)
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lightning_merak import topology
from lightning_merak._compat import local_shard
from lightning_merak.config import MerakConfigError

BUCKET_BYTES = 25 * 2**20  # bytes moved per collective (all ranks' segments together), as DDP's buckets


@dataclass(frozen=True)
class ParameterOwnership:
    """Which data-parallel rank steps each parameter (by index in the optimizer's order).

    Largest first onto the least loaded rank (the LPT rule): no rank holds more than ``1/world`` of the bytes
    plus one parameter.
    """

    owners: tuple[int, ...]
    world: int

    @classmethod
    def balanced(cls, nbytes: Sequence[int], world: int) -> ParameterOwnership:
        loads = [0] * world
        owners = [0] * len(nbytes)
        for i in sorted(range(len(nbytes)), key=lambda i: (-nbytes[i], i)):
            rank = min(range(world), key=lambda r: (loads[r], r))
            owners[i] = rank
            loads[rank] += nbytes[i]
        return cls(tuple(owners), world)

    def owned(self, rank: int) -> list[int]:
        return [i for i, r in enumerate(self.owners) if r == rank]

    def loads(self, nbytes: Sequence[int]) -> list[int]:
        out = [0] * self.world
        for i, r in enumerate(self.owners):
            out[r] += nbytes[i]
        return out


@dataclass(frozen=True)
class Bucket:
    """One reduce-scatter / all-gather: rank r's segment holds ``members[r]`` (parameter indices) flattened in
    order, padded to ``segment`` elements; the collective moves ``world x segment`` elements of ``dtype``."""

    dtype: torch.dtype
    members: tuple[tuple[int, ...], ...]
    segment: int


def plan_buckets(ownership: ParameterOwnership, indices: Sequence[int], numels: Sequence[int],
                 dtypes: Sequence[torch.dtype], bucket_bytes: int = BUCKET_BYTES) -> list[Bucket]:
    """Buckets over the parameters ``indices``: per dtype, each rank's owned parameters in order, taken in
    turns of about ``bucket_bytes / world`` per rank (at least one parameter, so a large one travels alone)."""
    buckets = []
    for dtype in dict.fromkeys(dtypes[i] for i in indices):
        cap = max(1, bucket_bytes // (ownership.world * torch.empty((), dtype=dtype).element_size()))
        queues = [[i for i in indices if dtypes[i] == dtype and ownership.owners[i] == r]
                  for r in range(ownership.world)]
        while any(queues):
            members = []
            for queue in queues:
                take, n = [], 0
                while queue and (not take or n + numels[queue[0]] <= cap):
                    n += numels[queue[0]]
                    take.append(queue.pop(0))
                members.append(tuple(take))
            buckets.append(Bucket(dtype, tuple(members), max(sum(numels[i] for i in m) for m in members)))
    return buckets


class ReplicatedOptimizer:
    """Stage 0: every replica holds every gradient and steps every parameter (DDP)."""

    shards_gradients = False

    def __init__(self, optimizer: torch.optim.Optimizer, group: dist.ProcessGroup | None, world: int) -> None:
        self.optimizer, self.group, self.world = optimizer, group, world

    def sync_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` (the module's trainable parameters) over the replicas."""
        topology.allreduce_grads(params, self.group, self.world)

    def after_step(self) -> None:
        """Nothing to exchange: every replica stepped every parameter."""


class ShardedOptimizer:
    """Stages 1 and 2 for one of the user's optimizers over the data-parallel group (see the module docstring).

    Replaces the optimizer's ``step`` on the instance by ``step_owned``; every caller (Lightning's precision
    plugin, torch's checkpoint helpers, the user) then steps the owned parameters only.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, stage: int, group: dist.ProcessGroup | None,
                 bucket_bytes: int = BUCKET_BYTES) -> None:
        if isinstance(optimizer, torch.optim.LBFGS):
            raise MerakConfigError(
                f"zero_stage={stage} cannot shard {type(optimizer).__name__}: its step is a line search over all "
                "parameters together, not a per-parameter update. Use zero_stage=0 with LBFGS."
            )
        self.optimizer, self.stage, self.group = optimizer, stage, group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.bucket_bytes = bucket_bytes
        self.shards_gradients = stage == 2  # the clip norm then sums the owners' gradients over dp
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        # full (global) sizes: every tensor-parallel rank of a replica must agree on the owners
        self.ownership = ParameterOwnership.balanced([p.numel() * p.element_size() for p in self.params],
                                                     self.world)
        self.owned = {id(self.params[i]) for i in self.ownership.owned(self.rank)}
        self._numels = [local_shard(p).numel() for p in self.params]
        self._dtypes = [p.dtype for p in self.params]
        self._buckets: dict[tuple[int, ...], list[Bucket]] = {}
        self._gloo = dist.get_backend(group) == "gloo"
        self._global_ranks = [dist.get_global_rank(group, r) if group is not None else r for r in range(self.world)]
        optimizer.register_state_dict_post_hook(self._owned_state)
        optimizer.register_load_state_dict_pre_hook(self._owned_state)
        self._step = optimizer.step
        optimizer.step = self.step_owned

    # ------------------------------------------------------------------ the sync point
    def sync_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` (the module's trainable parameters): stage 1 all of them, stage 2
        leaves this rank with its owned ones only (None for the others it shards). Parameters this optimizer
        does not hold are all-reduced as in stage 0."""
        self._check_param_groups()
        if self.stage == 1:
            topology.allreduce_grads(params, self.group, self.world)
            return
        sharded = {id(p) for p in self.params}
        topology.allreduce_grads([p for p in params if id(p) not in sharded], self.group, self.world)
        self._reduce_scatter()
        self._free_unowned_grads()

    def step_owned(self, closure: Any = None) -> Any:
        """The optimizer's step over the owned parameters: run the closure (Lightning's: training step, backward,
        the sync, hooks, clipping), free the other gradients, step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._free_unowned_grads()
        self._step()
        return loss

    def _free_unowned_grads(self) -> None:
        for p in self.params:
            if id(p) not in self.owned:
                p.grad = None

    def _reduce_scatter(self) -> None:
        # a gradient present on some replicas only (a branch not taken there) is zero on the others; on none, None
        present = torch.tensor([p.grad is not None for p in self.params], dtype=torch.int32,
                               device=self.params[0].device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX, group=self.group)
        for bucket in self._layout([i for i, p in enumerate(self.params) if present[i] and p.requires_grad]):
            flat = torch.zeros(self.world * bucket.segment, dtype=bucket.dtype, device=self.params[0].device)
            for r, members in enumerate(bucket.members):
                offset = r * bucket.segment
                for i in members:
                    grad = self.params[i].grad
                    if grad is not None:
                        flat[offset:offset + self._numels[i]].copy_(local_shard(grad).reshape(-1))
                    offset += self._numels[i]
            mine = self._reduce_to_owners(flat, bucket.segment)
            mine.div_(self.world)  # SUM: gloo has no AVG
            offset = 0
            for i in bucket.members[self.rank]:
                p = self.params[i]
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                local_shard(p.grad).copy_(mine[offset:offset + self._numels[i]].view_as(local_shard(p.grad)))
                offset += self._numels[i]

    # ------------------------------------------------------------------ after the optimizer step
    def after_step(self) -> None:
        """All-gather the owners' updated parameters; drop any state of parameters this rank does not own."""
        for p in self.params:
            if id(p) not in self.owned:
                self.optimizer.state.pop(p, None)
        with torch.no_grad():
            for bucket in self._layout([i for i, p in enumerate(self.params) if p.requires_grad]):
                mine = torch.zeros(bucket.segment, dtype=bucket.dtype, device=self.params[0].device)
                offset = 0
                for i in bucket.members[self.rank]:
                    mine[offset:offset + self._numels[i]].copy_(local_shard(self.params[i]).reshape(-1))
                    offset += self._numels[i]
                flat = self._gather_from_owners(mine)
                for r, members in enumerate(bucket.members):
                    if r == self.rank:
                        continue
                    offset = r * bucket.segment
                    for i in members:
                        local = local_shard(self.params[i])
                        local.copy_(flat[offset:offset + self._numels[i]].view_as(local))
                        offset += self._numels[i]

    # ------------------------------------------------------------------ the collectives
    # gloo has no native reduce-scatter or all-gather: its reduce-scatter costs more than an all-reduce of the
    # whole buffer, its all-gather twice the owners' broadcasts of their segments (measured, 2 CPU processes,
    # 4 MB: 6.3 / 4.7 ms and 3.1 / 1.6 ms). The buffer is whole on every rank either way, so on gloo the cheaper
    # collective costs no memory.
    def _reduce_to_owners(self, flat: torch.Tensor, segment: int) -> torch.Tensor:
        """The SUM over the replicas of this rank's ``segment`` of ``flat``."""
        if self._gloo:
            dist.all_reduce(flat, group=self.group)
            return flat[self.rank * segment:(self.rank + 1) * segment]
        mine = torch.empty(segment, dtype=flat.dtype, device=flat.device)
        dist.reduce_scatter_single(mine, flat, group=self.group)
        return mine

    def _gather_from_owners(self, mine: torch.Tensor) -> torch.Tensor:
        """Every rank's ``mine``, in rank order, flat."""
        flat = torch.empty(self.world * mine.numel(), dtype=mine.dtype, device=mine.device)
        if not self._gloo:
            dist.all_gather_single(flat, mine, group=self.group)
            return flat
        segments = flat.view(self.world, -1)
        segments[self.rank].copy_(mine)
        works = [dist.broadcast(segments[r], src=self._global_ranks[r], group=self.group, async_op=True)
                 for r in range(self.world)]
        for work in works:
            work.wait()
        return flat

    # ------------------------------------------------------------------ helpers
    def _layout(self, indices: list[int]) -> list[Bucket]:
        key = tuple(indices)
        if key not in self._buckets:
            self._buckets[key] = plan_buckets(self.ownership, indices, self._numels, self._dtypes, self.bucket_bytes)
        return self._buckets[key]

    def _check_param_groups(self) -> None:
        now = [p for g in self.optimizer.param_groups for p in g["params"]]
        if len(now) != len(self.params) or any(a is not b for a, b in zip(now, self.params, strict=True)):
            raise MerakConfigError(
                f"The optimizer's parameters changed after setup (a param group was added, e.g. by "
                f"BackboneFinetuning): zero_stage={self.stage} assigns owners to the parameters present when "
                "Lightning set the optimizer up. Put every parameter in the optimizer from the start (frozen ones "
                "too), or use zero_stage=0."
            )

    def _owned_state(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict()`` (and what ``load_state_dict`` takes in) with owned state only and an empty entry for
        every other parameter: a checkpoint then gets each entry from its owner, and the name-keyed loading,
        which wants an entry per trainable parameter, reads the owned ones only."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = state_dict["state"]
        for index, p in enumerate(params):
            if id(p) not in self.owned:
                state[index] = {}
        return state_dict


def data_parallel_optimizer(optimizer: torch.optim.Optimizer, zero_stage: int, group: dist.ProcessGroup | None,
                            world: int) -> ReplicatedOptimizer | ShardedOptimizer:
    """The data-parallel side of one optimizer: stage 0 (or one replica) replicated, else sharded."""
    if zero_stage == 0 or world <= 1:
        return ReplicatedOptimizer(optimizer, group, world)
    return ShardedOptimizer(optimizer, zero_stage, group)


def weight_sized_states(optimizer: torch.optim.Optimizer) -> float | None:
    """How many weight-sized tensors ``optimizer`` keeps per parameter (SGD 0, with momentum 1, Adam 2), the
    largest over its param groups; None where it cannot be told. Measured, not looked up: the same class with
    each group's hyperparameters steps a probe parameter once, on the CPU, and its state is counted. The
    memory-aware partition is planned before the real optimizer exists, on weights that may be on meta."""
    probe_size = 1024
    copies = 0.0
    accepted = inspect.signature(type(optimizer)).parameters
    for group in optimizer.param_groups:
        settings = {k: group[k] for k in optimizer.defaults if k in group and k in accepted and k != "params"}
        if settings.get("fused"):
            settings["fused"] = False  # the probe is on the CPU; a fused kernel keeps the same state
        probe = torch.nn.Parameter(torch.zeros(probe_size))
        try:
            trial = type(optimizer)([probe], **settings)
            probe.grad = torch.full_like(probe, 1e-3)
            trial.step(lambda: torch.zeros(())) if isinstance(trial, torch.optim.LBFGS) else trial.step()
        except Exception:  # noqa: BLE001 — a custom optimizer the probe cannot rebuild: unknown
            return None
        state = trial.state.get(probe, {})
        copies = max(copies, sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor)
                                 and v.numel() >= probe_size) / probe_size)
    return copies


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's optimizer state (tensor-parallel shards counted locally)."""
    return sum(parameter_state_bytes(s) for s in optimizer.state.values())


def parameter_state_bytes(state: dict[str, Any]) -> int:
    """Bytes of one parameter's optimizer state (``optimizer.state[p]``)."""
    return sum(local_shard(v).numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


def gradient_bytes(params: Sequence[torch.nn.Parameter]) -> int:
    """Bytes of the gradients this rank holds."""
    return sum(local_shard(p.grad).numel() * p.grad.element_size() for p in params if p.grad is not None)
