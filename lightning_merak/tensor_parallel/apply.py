"""Turn a ``TPPlan`` into DTensor-parallel modules, in place: styles, head attributes, tied weights."""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from lightning_merak._compat import parameter_slots
from lightning_merak.tensor_parallel.plan import TPPlan
from lightning_merak.tensor_parallel.styles import (
    ColumnParallel,
    ExpertsParallel,
    MultiheadAttentionParallel,
    RowParallel,
)


def apply_tensor_parallel(module: nn.Module, tp_mesh: DeviceMesh, plan: TPPlan, subtensor_chunks: int = 2) -> nn.Module:
    """Shard ``module`` over ``tp_mesh`` as ``plan`` says; ``subtensor_chunks`` > 1 overlaps TP all-reduces.

    Plan entries whose module is gone or holds no parameters (a pipeline stage's stubs) are skipped.
    """
    if tp_mesh.ndim != 1 or tp_mesh.size() != plan.tp_size:
        raise ValueError(f"the plan was made for tensor_parallel_size={plan.tp_size}; the mesh is {tp_mesh} "
                         f"(pass the 1-D 'tp' sub-mesh, e.g. mesh['tp'])")
    if not isinstance(subtensor_chunks, int) or subtensor_chunks < 1:
        raise ValueError(f"subtensor_chunks must be an integer >= 1 (1 disables sub-tensor overlap), got "
                         f"{subtensor_chunks!r}")
    _warn_if_beyond_node(plan.tp_size, tp_mesh.device_type)
    tied = _tied_parameters(module)
    styles = _parallel_styles(module, plan, subtensor_chunks)
    if styles:
        parallelize_module(module, tp_mesh, styles)
    _set_head_attributes(module, plan)
    _slice_head_inputs(module, plan, tp_mesh.get_local_rank())
    _retie(tied)
    return module


def _warn_if_beyond_node(tp_size: int, device_type: str) -> None:
    """TP all-reduces every layer: across nodes it is bandwidth-bound (Megatron keeps TP within a node)."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    devices = int(local) if local else (torch.cuda.device_count() if device_type == "cuda" else None)
    if devices and tp_size > devices:
        warnings.warn(f"tensor_parallel_size={tp_size} is larger than the {devices} devices of one node: TP's "
                      "per-layer all-reduces will cross nodes and be slow; prefer tp <= devices per node and "
                      "use pipeline or data parallelism across nodes", stacklevel=3)


def _style_for(style: str, target: nn.Module, chunks: int, fused: int) -> ParallelStyle:
    plain_linear = chunks == 1 and type(target) is nn.Linear
    if style == "colwise":
        return ColwiseParallel() if plain_linear else ColumnParallel(chunks)
    if style == "colwise_fused":
        return ColumnParallel(chunks, fused=fused)
    if style == "rowwise":
        return RowwiseParallel() if plain_linear else RowParallel(chunks)
    if style == "embedding_vocab":
        return RowwiseParallel(input_layouts=Replicate())
    if style == "head_vocab_gather":
        return ColwiseParallel(output_layouts=Replicate())
    if style == "moe_experts":
        return ExpertsParallel()
    if style == "embedding_heads":  # columns are heads: the output holds this rank's heads
        return ColwiseParallel()
    if style == "mha_heads":
        return MultiheadAttentionParallel(chunks)
    raise ValueError(f"unknown tensor parallel style {style!r}")


def _parallel_styles(module: nn.Module, plan: TPPlan, chunks: int) -> dict[str, ParallelStyle]:
    names = dict(module.named_modules())
    styles = {}
    for fqn, style in plan.styles.items():
        target = names.get(fqn)
        if target is None or next(target.parameters(), None) is None:
            continue  # another pipeline stage's layer, replaced by a stub
        styles[fqn] = _style_for(style, target, chunks, plan.fused.get(fqn, 1))
    return styles


def _set_head_attributes(module: nn.Module, plan: TPPlan) -> None:
    """Head counts and widths the attention module reads in forward now count local heads only."""
    names = dict(module.named_modules())
    for fqn, attrs in plan.attributes.items():
        owner = names.get(fqn)
        if owner is None or next(owner.parameters(), None) is None:
            continue
        for attr, value in attrs.items():
            setattr(owner, attr, value)


def _slice_head_inputs(module: nn.Module, plan: TPPlan, rank: int) -> None:
    """Attention modules that receive a per-head tensor built for all heads (BLOOM's ALiBi) take their own part.

    A tensor that already counts local heads (made inside a sharded module) passes unchanged.
    """
    names = dict(module.named_modules())
    for fqn, inputs in plan.head_inputs.items():
        owner = names.get(fqn)
        if owner is None or next(owner.parameters(), None) is None:
            continue

        def hook(_m, args, kwargs, inputs=inputs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() >= 2]
            if not tensors:
                return None
            batch = tensors[0].shape[0]
            args = tuple(_own_heads(a, *inputs[str(i)], plan.tp_size, rank, batch) if str(i) in inputs else a
                         for i, a in enumerate(args))
            kwargs = {k: _own_heads(v, *inputs[k], plan.tp_size, rank, batch) if k in inputs else v
                      for k, v in kwargs.items()}
            return args, kwargs

        owner.register_forward_pre_hook(hook, with_kwargs=True)


def _own_heads(t, layout: str, heads: int, tp: int, rank: int, batch: int):
    local = heads // tp
    if not isinstance(t, torch.Tensor):
        return t
    if layout == "batch_heads" and t.shape[0] == batch * heads:
        own = t.view(batch, heads, *t.shape[1:])[:, rank * local:(rank + 1) * local]
        return own.reshape(batch * local, *t.shape[1:])
    if layout == "heads" and t.dim() > 1 and t.shape[1] == heads:
        return t[:, rank * local:(rank + 1) * local]
    return t


def _tied_parameters(module: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    seen: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in module.modules():
        for name, p in parameter_slots(m).items():
            if p is not None:
                seen.setdefault(id(p), []).append((m, name))
    return [owners for owners in seen.values() if len(owners) > 1]


def _retie(tied: list[list[tuple[nn.Module, str]]]) -> None:
    """Styles distribute each module's parameter separately; make tied weights one DTensor parameter again."""
    for owners in tied:
        params = [parameter_slots(m)[name] for m, name in owners]
        shared = next((p for p in params if isinstance(p, DTensor)), None)
        if shared is None:
            continue
        for (m, name), p in zip(owners, params, strict=True):
            if isinstance(p, DTensor) and p.placements != shared.placements:
                names = ", ".join(f"{type(o).__name__}.{n}" for o, n in owners)
                raise ValueError(f"tied parameters ({names}) got different tensor parallel layouts "
                                 f"{p.placements} and {shared.placements}; shard them alike or untie them")
            parameter_slots(m)[name] = shared
