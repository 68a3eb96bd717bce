"""Gradient clipping by the norm of the *whole* model when its parameters are spread over processes.

Under pipeline parallelism each rank holds one stage, under tensor parallelism one shard: the local
``clip_grad_norm_`` would clip each piece by its own norm. Here squared norms are summed over the groups that
split the model (pp, tp), so every rank scales by the same global factor, as one process would.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def _local_square_sum(grad: torch.Tensor) -> torch.Tensor:
    """Sum of squares of this rank's share of ``grad``; a DTensor replicated over a mesh dim counts once."""
    placements = getattr(grad, "placements", None)
    if placements is None:
        return grad.detach().float().pow(2).sum()
    local = grad._local_tensor.detach().float().pow(2).sum()
    mesh = grad.device_mesh
    # replicated over a dim: every rank of that dim holds the same values; count them on one rank only
    for dim, placement in enumerate(placements):
        if placement.is_replicate() and mesh.get_local_rank(dim) != 0:
            return torch.zeros_like(local)
    return local


def grad_norm(parameters: Iterable[torch.nn.Parameter], groups: list[dist.ProcessGroup | None]) -> torch.Tensor:
    """The 2-norm of all gradients of a model whose parameters are split over ``groups``."""
    grads = [p.grad for p in parameters if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    if hasattr(device, "type") and grads and hasattr(grads[0], "_local_tensor"):
        device = grads[0]._local_tensor.device
    total = torch.zeros((), device=device, dtype=torch.float32)
    for g in grads:
        total = total + _local_square_sum(g).to(device)
    for grp in groups:
        if grp is not None:
            dist.all_reduce(total, group=grp)
    return total.sqrt()


def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float,
                    groups: list[dist.ProcessGroup | None]) -> torch.Tensor:
    """Scale gradients in place so the global norm is at most ``max_norm``; return the global norm."""
    params = [p for p in parameters if p.grad is not None]
    norm = grad_norm(params, groups)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype) if not hasattr(p.grad, "_local_tensor") else coef.item())
    return norm
