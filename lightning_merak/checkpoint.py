"""Sharded checkpoints that any topology can load, and their consolidation into a plain Lightning file.

A checkpoint is a folder written with ``torch.distributed.checkpoint`` (DCP): every rank writes the tensors
it holds under the *original* parameter names (a pipeline stage its own layers, a tensor-parallel rank its
shards as DTensors), plus ``meta.pt`` from rank 0 with everything else Lightning saves (loops, callbacks,
schedulers). Optimizer state is keyed by parameter name too, with each parameter's param-group index stored
under its own key, so ranks holding different parameters never overwrite each other's entries. Loading asks
DCP only for the keys the loading rank holds, which is why a dp x pp x tp checkpoint resumes on any layout.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lightning_merak._compat import _distributed_is_initialized, dcp_load_everything

META_FILE = "meta.pt"


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file()


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "_optimizer", optimizer)


def _optimizer_entry(module: torch.nn.Module, optimizer: Any, stage: int = 0,
                     stage_of: dict[int, int] | None = None) -> dict[str, Any]:
    """Optimizer state keyed by parameter name, with per-parameter group membership and position (see module
    docstring). The position (pipeline stage, index in the stage's module order) restores the parameter order
    of the whole model when the checkpoint is consolidated. ``stage_of``: id(parameter) -> its stage, where a
    rank holds several (interleaved, V); other parameters count as ``stage``."""
    opt = _unwrap(optimizer)
    sd = get_optimizer_state_dict(module, opt)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    group_of = {name: i for i, g in enumerate(sd["param_groups"]) for name in g["params"]}
    named = list(module.named_parameters())
    module_order = {name: i for i, (name, _) in enumerate(named)}
    stages = {name: (stage_of or {}).get(id(p), stage) for name, p in named}
    position = {name: [stages.get(name, stage), module_order.get(name, -1)] for name in group_of}
    return {"state": sd["state"], "group_of": group_of, "groups": groups, "position": position}




def save_sharded(path: Path, checkpoint: dict[str, Any], module: torch.nn.Module, optimizers: list[Any],
                 is_rank_zero: bool, stage: int = 0, stage_of: dict[int, int] | None = None) -> None:
    """Write ``checkpoint`` (Lightning's dict) as a DCP folder; weights and optimizer state come from the live
    module and optimizers so each rank contributes exactly what it holds."""
    if path.is_file():
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    checkpoint = dict(checkpoint)
    checkpoint.pop("state_dict", None)
    checkpoint.pop("optimizer_states", None)
    state: dict[str, Any] = {"state_dict": get_model_state_dict(module)}
    for i, opt in enumerate(optimizers):
        state[f"optimizer_{i}"] = _optimizer_entry(module, opt, stage, stage_of)
    dcp.save(state, checkpoint_id=path, no_dist=not _distributed_is_initialized())
    if is_rank_zero:
        torch.save(checkpoint, path / META_FILE)


def load(path: Path, module: torch.nn.Module, optimizers: list[Any], strict: bool = True) -> dict[str, Any]:
    """Load a sharded folder (any topology) or a plain ``.ckpt`` file into this rank's module and optimizers;
    return the remaining Lightning checkpoint entries (loops, callbacks, ...)."""
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    if not is_sharded_checkpoint(path):
        return _load_full_file(path, module, optimizers, strict)
    model_sd = get_model_state_dict(module)
    state: dict[str, Any] = {"state_dict": model_sd}
    templates = [_optimizer_entry(module, opt) for opt in optimizers]
    for i, entry in enumerate(templates):
        state[f"optimizer_{i}"] = entry
    dcp.load(state, checkpoint_id=path, no_dist=not _distributed_is_initialized())
    set_model_state_dict(module, state["state_dict"], options=StateDictOptions(strict=strict))
    for i, opt in enumerate(optimizers):
        _restore_optimizer(module, opt, state[f"optimizer_{i}"])
    meta = torch.load(path / META_FILE, map_location="cpu", weights_only=False)
    return meta


def _restore_optimizer(module: torch.nn.Module, optimizer: Any, entry: dict[str, Any]) -> None:
    opt = _unwrap(optimizer)
    names = list(entry["group_of"].keys())
    groups = []
    for i, hyper in enumerate(entry["groups"]):
        groups.append({**hyper, "params": [n for n in names if entry["group_of"][n] == i]})
    set_optimizer_state_dict(module, opt, {"state": entry.get("state", {}), "param_groups": groups})


def _load_full_file(path: Path, module: torch.nn.Module, optimizers: list[Any], strict: bool) -> dict[str, Any]:
    """A consolidated (or plain Lightning) checkpoint: full tensors keyed by name; optimizer state by position."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    local = get_model_state_dict(module)
    full = checkpoint["state_dict"]
    missing = [k for k in local if k not in full]
    if strict and missing:
        raise KeyError(f"checkpoint {path} lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
    set_model_state_dict(module, {k: full[k] for k in local if k in full},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False, strict=strict))
    opt_states = checkpoint.get("optimizer_states", [])
    for opt, opt_sd in zip(optimizers, opt_states, strict=False):
        named = positional_to_named(opt_sd, checkpoint.get("merak_param_order"))
        if named is None:
            warnings.warn(f"{path} holds optimizer state by position only (not written by `lightning-merak "
                          "consolidate`), so it cannot be matched to this stage's parameters: the optimizer starts "
                          "fresh; the weights are loaded.", stacklevel=2)
            continue
        _restore_optimizer(module, opt, _restrict(named, local))
    return {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}


def _restrict(entry: dict[str, Any], local: dict[str, Any]) -> dict[str, Any]:
    keep = {n for n in entry["group_of"] if n in local}
    return {"state": {n: s for n, s in entry.get("state", {}).items() if n in keep},
            "group_of": {n: g for n, g in entry["group_of"].items() if n in keep}, "groups": entry["groups"]}


def parameter_order(entry: dict[str, Any]) -> list[str]:
    """Names in the order one process registers them: stage by stage, module order within a stage."""
    return sorted(entry["position"], key=lambda n: tuple(entry["position"][n]))


def named_to_positional(entry: dict[str, Any], param_order: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Turn a name-keyed optimizer entry into ``torch.optim.Optimizer.state_dict()`` layout.

    Parameters are numbered the way a single-process optimizer numbers them: group by group, each group's
    parameters in module registration order (``param_order``). Returns the state dict and the name order used.
    """
    order: list[str] = []
    groups = []
    for i, hyper in enumerate(entry["groups"]):
        names = [n for n in param_order if entry["group_of"].get(n) == i]
        groups.append({**hyper, "params": list(range(len(order), len(order) + len(names)))})
        order.extend(names)
    state = {order.index(n): s for n, s in entry.get("state", {}).items() if n in order}
    return {"state": state, "param_groups": groups}, order


def positional_to_named(opt_sd: dict[str, Any], order: list[str] | None) -> dict[str, Any] | None:
    if order is None:
        return None
    group_of = {}
    for gi, g in enumerate(opt_sd["param_groups"]):
        for pid in g["params"]:
            group_of[order[pid]] = gi
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt_sd["param_groups"]]
    return {"state": {order[pid]: s for pid, s in opt_sd["state"].items()}, "group_of": group_of, "groups": groups}


def consolidate(folder: Path, output: Path) -> Path:
    """Merge a sharded folder into one ordinary Lightning checkpoint file (full tensors, positional optimizer
    state), loadable with ``MyModule.load_from_checkpoint`` and resumable with ``trainer.fit(ckpt_path=...)``."""
    if not is_sharded_checkpoint(folder):
        raise ValueError(f"{folder} is not a Merak sharded checkpoint (a folder with {META_FILE}).")
    raw = dcp_load_everything(folder)
    meta = torch.load(folder / META_FILE, map_location="cpu", weights_only=False)
    state_dict = raw["state_dict"]
    out: dict[str, Any] = {**meta, "state_dict": state_dict}
    optimizer_states = []
    i = 0
    while f"optimizer_{i}" in raw:
        positional, order = named_to_positional(raw[f"optimizer_{i}"], parameter_order(raw[f"optimizer_{i}"]))
        optimizer_states.append(positional)
        out["merak_param_order"] = order
        i += 1
    out["optimizer_states"] = optimizer_states
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, output)
    return output


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
