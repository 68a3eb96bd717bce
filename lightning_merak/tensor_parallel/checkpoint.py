"""Checkpointing strided (per-head q|k|v) shards with DCP, keyed by original names and full shapes.

DCP stores one contiguous box per rank and rejects a strided shard ("overlapping chunks"). At checkpoint time
these hooks all-gather such a tensor and hand out a contiguous ``Shard`` of the same full tensor instead, and
convert back on load. So ``get_model_state_dict`` / ``get_optimizer_state_dict`` + DCP work unchanged, and a
tp = 2 checkpoint loads into tp = 1 and back. Only fused layers pay the gather.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from lightning_merak._compat import _StridedShard


def _contiguous(value):
    """A strided-shard DTensor as a contiguous ``Shard`` of the same full tensor (collective); else unchanged."""
    if isinstance(value, DTensor) and any(isinstance(p, _StridedShard) for p in value.placements):
        placements = [Shard(p.dim) if isinstance(p, _StridedShard) else p for p in value.placements]
        return distribute_tensor(value.full_tensor(), value.device_mesh, placements, src_data_rank=None)
    return value


def _like(value, param: DTensor):
    """``value`` (a DTensor of any layout, or a full tensor) laid out as ``param``."""
    full = value.full_tensor() if isinstance(value, DTensor) else value
    return distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)


def _checkpoint_as_contiguous_shards(module: nn.Module, names: tuple[str, ...]) -> None:
    """Model state dicts see the module's strided parameters ``names`` as contiguous shards."""
    def as_shard(_module, state_dict, prefix, _metadata):
        for name in names:
            if prefix + name in state_dict:
                state_dict[prefix + name] = _contiguous(state_dict[prefix + name])

    def as_strided(_module, state_dict, prefix, *_args):
        for name in names:
            param = getattr(_module, name, None)
            if prefix + name in state_dict and isinstance(param, DTensor):
                state_dict[prefix + name] = _like(state_dict[prefix + name], param)

    module.register_state_dict_post_hook(as_shard)
    module.register_load_state_dict_pre_hook(as_strided)


def make_optimizer_checkpointable(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Optimizer state of strided parameters (momentum, Adam moments) also as contiguous shards in state dicts.

    Call once after building the optimizer over a model that went through ``apply_tensor_parallel``; harmless
    when no parameter is strided.
    """
    def params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [p for group in opt.param_groups for p in group["params"]]

    def as_shard(opt, state_dict):
        for index, param in enumerate(params(opt)):
            state = state_dict["state"].get(index)
            if state and isinstance(param, DTensor) and any(isinstance(p, _StridedShard) for p in param.placements):
                state_dict["state"][index] = {k: _contiguous(v) for k, v in state.items()}
        return state_dict

    def as_strided(opt, state_dict):
        for index, param in enumerate(params(opt)):
            state = state_dict["state"].get(index)
            if state and isinstance(param, DTensor) and any(isinstance(p, _StridedShard) for p in param.placements):
                state_dict["state"][index] = {k: _like(v, param) if isinstance(v, torch.Tensor) and v.dim() else v
                                              for k, v in state.items()}
        return state_dict

    optimizer.register_state_dict_post_hook(as_shard)
    optimizer.register_load_state_dict_pre_hook(as_strided)
    return optimizer
