"""The 3D device mesh (dp, pp, tp) and the rank helpers the rest of the package uses.

Rank layout: tp is the innermost dimension (adjacent ranks, the fastest links on a node), then pp, then dp,
as in Megatron-LM and Merak. Global rank = (dp_rank * pp + pp_rank) * tp + tp_rank.

Lifetime of the groups: a run ends with ``quiesce`` (nothing of it is left in flight), then its strategy
``retire``s the groups it made. They stay usable for a later validate/test with the same Trainer (its stage and
tensor-parallel shards hold them). A mesh's groups are reused by the next strategy of the same layout in this
process (torch caches sub-meshes by layout, so a new mesh of that layout would be handed the old groups anyway):
repeated fits hold one set of mesh groups per layout, not one per fit. Other retired groups (tied weights') are
destroyed when another strategy sets up (``destroy_retired``); everything when the process exits
(``destroy_at_exit``: gloo's and NCCL's threads end before the interpreter does).
"""

from __future__ import annotations

import atexit
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from lightning_merak._compat import live_process_groups, local_shard

MESH_DIMS = ("dp", "pp", "tp")


@dataclass(frozen=True)
class Coordinate:
    """Where one global rank sits in the 3D mesh."""

    rank: int
    dp: int
    pp: int
    tp: int


def coordinate(rank: int, dp: int, pp: int, tp: int) -> Coordinate:
    """Inverse of the rank layout above (pure, so it can be printed for every rank without communicating)."""
    if not 0 <= rank < dp * pp * tp:
        raise ValueError(f"rank {rank} is outside a {dp}x{pp}x{tp} mesh")
    return Coordinate(rank=rank, dp=rank // (pp * tp), pp=(rank // tp) % pp, tp=rank % tp)


def build_mesh(device_type: str, dp: int, pp: int, tp: int, timeout: timedelta | None = None) -> DeviceMesh:
    """Create the (dp, pp, tp) mesh over the already initialised default process group.

    The groups of each dimension are made here, with ``timeout``: ``init_device_mesh`` makes them with the
    backend's default (30 min for gloo) whatever the default group's timeout, so a rank missing from a pipeline
    or tensor-parallel collective would hang that long. A dimension spanning all ranks uses the default group.
    """
    key = (device_type, dp, pp, tp, None if timeout is None else timeout.total_seconds(), dist.get_world_size())
    cached = _meshes.get(key)
    if cached is not None and all(_is_live(g) for g in mesh_groups(cached)):
        # torch caches a mesh's sub-meshes (and so their groups) by its layout: a new mesh of the same layout would
        # be handed the old one's, so a later run of the same layout in this process reuses its groups instead
        reclaim(mesh_groups(cached))
        return cached
    layout = torch.arange(dp * pp * tp).view(dp, pp, tp)
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = []
    for d in range(len(MESH_DIMS)):
        mine = None
        for ranks in layout.movedim(d, -1).reshape(-1, layout.shape[d]).tolist():
            # new_group is collective: every rank makes every group, in the same order
            made = dist.group.WORLD if len(ranks) == world else dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine = made
        groups.append(mine)
    mesh = DeviceMesh.from_group(groups, device_type, mesh=layout, mesh_dim_names=MESH_DIMS)
    _meshes[key] = mesh
    return mesh


def mesh_groups(mesh: DeviceMesh | None) -> list[dist.ProcessGroup]:
    """The groups ``build_mesh`` made for ``mesh`` (a dimension spanning the world uses the default group)."""
    if mesh is None:
        return []
    return [g for g in (group(mesh, d) for d in MESH_DIMS) if g is not None and g is not dist.group.WORLD]


# ------------------------------------------------------------------------------------------- group lifetime
_retired: list[dist.ProcessGroup] = []  # groups of finished runs, destroyed by the next mesh or at exit
_meshes: dict[tuple, DeviceMesh] = {}  # every mesh built, by layout: its groups live until exit (``build_mesh``)
_made_default = False  # whether the default group is ours to destroy at exit (not the user's own)


def quiesce(device: torch.device) -> None:
    """Wait until nothing this run started is still in flight on this rank or its peers: the device's queued work
    (NCCL collectives, DELTA's side-stream copies), then a barrier over the world. Every pipeline send has been
    received and every async all-reduce joined once all ranks are here, so destroying the groups (or exiting)
    cannot cut one off. Every rank calls this, at the end of a run that ended normally everywhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def retire(groups: list[dist.ProcessGroup]) -> None:
    """Hand over the groups of a finished run (see the module docstring)."""
    for g in groups:
        if g is not dist.group.WORLD and all(g is not r for r in _retired):
            _retired.append(g)


def reclaim(groups: list[dist.ProcessGroup]) -> bool:
    """Take back retired groups for another run of the same strategy; False if any was destroyed meanwhile."""
    alive = all(_is_live(g) for g in groups)
    _retired[:] = [r for r in _retired if all(r is not g for g in groups)]
    return alive


def destroy_retired(keep_meshes: bool = True) -> None:
    """Destroy every retired group (local: other ranks do the same at the same point of their program); a mesh's
    groups only with ``keep_meshes=False`` (at exit), since a later mesh of its layout reuses them."""
    kept = {id(g) for m in _meshes.values() for g in mesh_groups(m)} if keep_meshes else set()
    for g in reversed(_retired):
        if _is_live(g) and id(g) not in kept:
            dist.destroy_process_group(g)
    _retired[:] = [g for g in _retired if id(g) in kept]
    if not keep_meshes:
        _meshes.clear()


def _is_live(g: dist.ProcessGroup) -> bool:
    return dist.is_initialized() and any(g is live for live in live_process_groups())


def own_default_group() -> None:
    """The strategy initialised torch.distributed: its default group is destroyed at exit too."""
    global _made_default
    _made_default = True


@atexit.register
def destroy_at_exit() -> None:
    """Every group this package made, then the default group if it made that too, before the interpreter ends
    (gloo's worker threads outliving it abort the process: "terminate called without an active exception").
    Destroying returns at once even with an operation in flight; after a failure the process leaves before this
    (``failures``)."""
    if not dist.is_initialized():
        return
    destroy_retired(keep_meshes=False)
    if _made_default:
        dist.destroy_process_group()


def topology_table(dp: int, pp: int, tp: int, hosts: list[str] | None = None) -> str:
    """A printable table: which global rank holds which (dp, pp, tp) coordinate."""
    lines = [f"Merak process topology: dp={dp} x pp={pp} x tp={tp} = {dp * pp * tp} processes",
             f"{'rank':>5} {'dp':>3} {'pp':>3} {'tp':>3}" + ("  host" if hosts else "")]
    for r in range(dp * pp * tp):
        c = coordinate(r, dp, pp, tp)
        lines.append(f"{r:>5} {c.dp:>3} {c.pp:>3} {c.tp:>3}" + (f"  {hosts[r]}" if hosts else ""))
    return "\n".join(lines)


def group(mesh: DeviceMesh | None, dim: str) -> dist.ProcessGroup | None:
    """The process group of one mesh dimension (None without a mesh: single process)."""
    if mesh is None:
        return None
    return mesh[dim].get_group()


def size(mesh: DeviceMesh | None, dim: str) -> int:
    return 1 if mesh is None else mesh[dim].size()


def local_rank(mesh: DeviceMesh | None, dim: str) -> int:
    return 0 if mesh is None else mesh[dim].get_local_rank()


def allreduce_grads(params: list[torch.nn.Parameter], grp: dist.ProcessGroup | None, world: int,
                    bucket_bytes: int = 25 * 2**20) -> None:
    """Average gradients over a data-parallel group, in flat buckets per dtype (DDP-style, after backward).

    Every rank reduces the same list in the same order, whichever parameters its batch reached: as in DDP with
    ``find_unused_parameters=True``, a parameter without a gradient on this rank counts as zeros, and afterwards
    holds the average like any other. A parameter without a gradient on *every* rank keeps ``grad=None``, as in
    one process over the union of the batches (so optimizers skip it, as they would there). Which ones those are
    is agreed with one small all-reduce of a presence mask.

    DTensor gradients (tensor parallel) are reduced through their local shard: each tp rank averages its own
    shard with the same shard of the other replicas.
    """
    if world <= 1 or not params:
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(present, group=grp)
    grads = []
    for p, anywhere in zip(params, present.tolist(), strict=True):
        if not anywhere:
            continue
        if p.grad is None:  # unused on this rank only: contributes zeros, receives the average
            p.grad = torch.zeros_like(p)
        g = p.grad
        grads.append(local_shard(g))
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for tensors in by_dtype.values():
        bucket: list[torch.Tensor] = []
        nbytes = 0
        for t in tensors + [None]:
            if t is not None:
                bucket.append(t)
                nbytes += t.numel() * t.element_size()
            if bucket and (t is None or nbytes >= bucket_bytes):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, group=grp)
                flat.div_(world)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, nbytes = [], 0


def broadcast_module(module: torch.nn.Module, grp: dist.ProcessGroup | None, world: int) -> None:
    """Make every data-parallel replica start from the same weights (those of dp rank 0), as DDP does."""
    if world <= 1 or grp is None:
        return
    src = dist.get_global_rank(grp, 0)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            local = local_shard(t)
            dist.broadcast(local.data, src=src, group=grp)


def sync_metrics_over(module: torch.nn.Module, grp: dist.ProcessGroup | None) -> None:
    """torchmetrics sync their state over the whole world by default, but the pipeline and tensor-parallel peers
    of one replica hold the same state (replayed from the last stage, or computed alike): counted again, every
    sample would count several times, which changes list-state metrics (retrieval, AUROC). Sync over ``grp``
    (the data-parallel group) instead, unless the user chose a group."""
    from torchmetrics import Metric

    for sub in module.modules():
        if isinstance(sub, Metric) and sub.process_group is None:
            sub.process_group = grp


def live_group_count() -> int:
    """Process groups alive in this process, the default one included (0 without torch.distributed)."""
    return len(live_process_groups()) if dist.is_initialized() else 0
