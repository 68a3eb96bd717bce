"""Gradient clipping by the global norm over pipeline and tensor-parallel ranks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor, Replicate

from lightning_merak._compat import local_shard


def _replication_weight(grad: torch.Tensor, group: ProcessGroup | None) -> float:
    """1/|group| when ``grad`` is replicated over a group its DTensor mesh spans, else 1.

    A group that is a mesh dimension of the DTensor: Shard → each shard counted once (weight 1);
    Replicate → the same values on every rank, counted once overall (weight 1/size). Plain tensors are
    replicated over any group that some DTensor parameter is laid out on (the TP group) and distinct over
    the others (pipeline stages hold different parameters).
    """
    if group is None:
        group = dist.group.WORLD
    size = dist.get_world_size(group)
    if isinstance(grad, DTensor):
        mesh = grad.device_mesh
        for dim in range(mesh.ndim):
            if _same_group(mesh.get_group(dim), group):
                return 1.0 / size if isinstance(grad.placements[dim], Replicate) else 1.0
        return 1.0
    return 1.0


def _same_group(a: ProcessGroup, b: ProcessGroup) -> bool:
    return a is b or dist.get_process_group_ranks(a) == dist.get_process_group_ranks(b)


def clip_grad_norm_(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float,
                    groups: list[ProcessGroup | None]) -> torch.Tensor:
    """Scale gradients in place so that their global 2-norm is at most ``max_norm``; return that norm.

    ``groups``: every process group whose ranks hold different parts of the model, e.g. ``[pp_group,
    tp_group]`` (not the data-parallel group of DDP-style replicas: their gradients are already equal).
    Each element is counted once: DTensor shards once per shard, replicated DTensors and plain tensors once
    per tensor-parallel group (a group some DTensor parameter's mesh spans).
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    tp_like = [g for g in groups if any(isinstance(x, DTensor) and any(
        _same_group(x.device_mesh.get_group(d), g if g is not None else dist.group.WORLD)
        for d in range(x.device_mesh.ndim)) for x in grads)]
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        local = local_shard(g)
        weight = 1.0
        for group in tp_like:
            if isinstance(g, DTensor):
                weight *= _replication_weight(g, group)
            else:
                weight /= dist.get_world_size(group)
        total += local.detach().double().pow(2).sum() * weight
    for group in groups:
        dist.all_reduce(total, group=group)
    total_norm = total.sqrt().float()
    coef = float(max_norm) / (float(total_norm) + 1e-6)
    if coef < 1.0:
        for g in grads:
            (local_shard(g)).mul_(coef)
    return total_norm
