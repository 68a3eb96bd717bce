"""Sharded checkpoints that any topology can load, and their consolidation into a plain Lightning file.

A checkpoint is a folder written with ``torch.distributed.checkpoint`` (DCP): every rank writes the tensors
it holds under the *original* parameter names (a pipeline stage its own layers, a tensor-parallel rank its
shards as DTensors), plus ``meta.pt`` from rank 0 with everything else Lightning saves (loops, callbacks,
schedulers). Optimizer state is keyed by parameter name too, with each parameter's param-group index stored
under its own key, so ranks holding different parameters never overwrite each other's entries. Loading asks
DCP only for the keys the loading rank holds, which is why a dp x pp x tp checkpoint resumes on any layout.
A weight tied across pipeline stages (GPT-2's wte = lm_head) has a copy on each stage holding it, under that
stage's name for it; its optimizer state is stored once, under the name one process gives the weight (its first
user's), so it is consolidated once and resumes on any layout (the copies' states are equal: their gradients
are summed).

Atomic: a checkpoint is written into a hidden sibling folder, ``merak_checkpoint.json`` is written last, and
only then does the folder take the checkpoint's name (the previous checkpoint of that name is kept until the
new one is complete). A folder without the marker is never loaded, overwritten or removed.

Safe: nothing in a checkpoint runs code on load unless the caller trusts it (Lightning's ``weights_only=False``).
``meta.pt`` and DCP's non-tensor entries are read with ``torch.load(weights_only=True)``, which admits every
standard Lightning entry (loops, ModelCheckpoint, EarlyStopping, LR schedulers, plain hparams); classes of
your own pass after ``torch.serialization.add_safe_globals``. DCP's ``.metadata``, a plain pickle, is read by
an unpickler that builds only DCP's metadata classes, torch sizes/dtypes/layouts and paths.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lightning_merak import failures
from lightning_merak._compat import (
    _distributed_is_initialized,
    _EmptyStateDictLoadPlanner,
    dcp_load_everything,
)

META_FILE = "meta.pt"
DCP_METADATA_FILE = ".metadata"
COMPLETE_FILE = "merak_checkpoint.json"  # written last: a folder holding it is a complete Merak checkpoint
FORMAT = {"format": "lightning_merak sharded checkpoint", "version": 1}
_TRUST_HINT = ("If you trust this file, load it with weights_only=False (e.g. trainer.fit(..., ckpt_path=..., "
               "weights_only=False)); for classes of your own, torch.serialization.add_safe_globals([...]) admits "
               "them.")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read or removed safely; the message names the file and what to do."""


def local_path(filepath: Any) -> Path:
    """The local folder of a checkpoint path; ``file://`` URLs are local, other URLs are refused (DCP writes
    through the local file system here: ``s3://b/x.ckpt`` would otherwise become a folder named ``s3:``)."""
    text = os.fspath(filepath)
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if scheme != "file":
            raise CheckpointError(
                f"checkpoint path {text!r} is a {scheme}:// URL, but MerakStrategy writes and reads sharded "
                "checkpoints on a local (or mounted network) file system only. Use a local path, e.g. "
                "a ModelCheckpoint dirpath on a mounted bucket, and copy the folder afterwards."
            )
        text = rest
    return Path(text)


def check_checkpoint_io(checkpoint_io: Any) -> None:
    """A ``CheckpointIO`` plugin would be silently bypassed (DCP writes the shards), so only the default passes."""
    from lightning.fabric.plugins import TorchCheckpointIO

    if checkpoint_io is not None and type(checkpoint_io) is not TorchCheckpointIO:
        raise CheckpointError(
            f"checkpoint_io={type(checkpoint_io).__name__} is not supported by MerakStrategy: each rank writes its "
            "shards with torch.distributed.checkpoint, so a CheckpointIO plugin would never see them. Remove the "
            "plugin; to save elsewhere, point ModelCheckpoint(dirpath=...) at a mounted folder."
        )


def is_sharded_checkpoint(path: Path) -> bool:
    """A complete Merak checkpoint: a folder whose completion marker was written (last)."""
    return path.is_dir() and (path / COMPLETE_FILE).is_file()


def _check_complete(path: Path) -> None:
    marker = path / COMPLETE_FILE
    if not marker.is_file():
        raise CheckpointError(
            f"{path} is a folder but not a complete Merak checkpoint: it lacks {COMPLETE_FILE}, which MerakStrategy "
            "writes last, so its save was interrupted or another tool wrote it. Load an earlier checkpoint."
        )
    try:
        found = json.loads(marker.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{marker} is not the JSON completion marker MerakStrategy writes ({err}); the folder "
                              "was altered after saving. Load an earlier checkpoint.") from None
    if found != FORMAT:
        raise CheckpointError(f"{marker} holds {str(found)[:200]}, not {FORMAT}: not a checkpoint this version of "
                              "lightning_merak wrote.")


def _reason(err: Exception) -> str:
    """One line of why a load failed: torch's weights-only refusal spans a page, one line names the global."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    refused = [line for line in lines if "Unsupported global" in line or "Unsupported operand" in line]
    return (refused or lines or [type(err).__name__])[0]


def _load_torch_file(path: Path, weights_only: bool | None) -> Any:
    """``torch.load`` that builds only tensors and plain containers unless the caller trusts the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only is not False)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint folder is incomplete.") from None
    except Exception as err:  # UnpicklingError, a torn zip, an unknown class: all mean "not what we wrote"
        raise CheckpointError(f"{path} cannot be loaded safely: {_reason(err)}. {_TRUST_HINT}") from err


# --- DCP's .metadata: a plain pickle in torch 2.13 -------------------------------------------------------
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_METADATA_CLASSES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                     ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
                     ("builtins", "set"), ("builtins", "frozenset")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch sizes, dtypes and layouts, paths and builtin containers only."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _METADATA_MODULES:  # the classes defined there, not what the module imports
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:
                return found
        elif (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a type DCP metadata holds")


class SafeFileSystemReader(FileSystemReader):
    """DCP's reader with ``.metadata`` read by ``_MetadataUnpickler`` instead of ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return read_dcp_metadata(Path(self.path), load_id=self.load_id)


def read_dcp_metadata(folder: Path, load_id: str | None = None) -> Metadata:
    path = folder / DCP_METADATA_FILE
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint folder is incomplete.") from None
    except Exception as err:
        raise CheckpointError(f"{path} cannot be loaded safely: {_reason(err)}. It is not the metadata DCP writes; the "
                              "folder was altered after saving. Load an earlier checkpoint.") from err
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP Metadata.")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = load_id
    return metadata


class _SafeBytesMixin:
    """DCP loads non-tensor entries (our optimizer bookkeeping) with ``torch.load(weights_only=False)``: check
    each with ``weights_only=True`` first, so only plain data reaches the full unpickler."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except Exception as err:
            raise CheckpointError(f"the checkpoint entry {read_item.dest_index.fqn!r} (in a .distcp shard) cannot be "
                                  f"loaded safely: {_reason(err)}. {_TRUST_HINT}") from err
        value.seek(0)
        super().load_bytes(read_item, value)  # type: ignore[misc]


class SafeLoadPlanner(_SafeBytesMixin, DefaultLoadPlanner):
    """DCP's planner for a template state dict, with checked non-tensor entries."""


class _SafeEverythingPlanner(_SafeBytesMixin, _EmptyStateDictLoadPlanner):
    """DCP's planner that loads every entry (consolidation), with checked non-tensor entries."""


def _dcp_load(load: Any, *args: Any, **kwargs: Any) -> Any:
    """DCP wraps any rank's failure in a ``CheckpointException`` (a BaseException, with every rank's traceback);
    ours are raised as they are, so the message names the file first."""
    try:
        return load(*args, **kwargs)
    except CheckpointException as wrapped:
        ours = [exc for exc, _ in wrapped.failures.values() if isinstance(exc, CheckpointError)]
        if ours:
            raise CheckpointError(str(ours[0])) from wrapped
        raise


def _reader_and_planner(folder: Path, weights_only: bool | None, everything: bool = False) -> tuple[Any, Any]:
    if weights_only is False:  # the caller trusts the folder: DCP's own reader and planner
        return FileSystemReader(folder), (_EmptyStateDictLoadPlanner() if everything else DefaultLoadPlanner())
    return SafeFileSystemReader(folder), (_SafeEverythingPlanner() if everything else SafeLoadPlanner())


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "_optimizer", optimizer)


def _optimizer_entry(module: torch.nn.Module, optimizer: Any, stage: int = 0,
                     stage_of: dict[int, int] | None = None, tied: dict[str, str] | None = None) -> dict[str, Any]:
    """Optimizer state keyed by parameter name, with per-parameter group membership and position (see module
    docstring). The position (pipeline stage, index in the stage's module order) restores the parameter order
    of the whole model when the checkpoint is consolidated. ``stage_of``: id(parameter) -> its stage, where a
    rank holds several (interleaved, V); other parameters count as ``stage``. ``tied``: this rank's names of
    copies of a weight tied across pipeline stages -> the name one process gives it (see module docstring)."""
    opt = _unwrap(optimizer)
    sd = get_optimizer_state_dict(module, opt)
    tied = tied or {}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    group_of = {tied.get(name, name): i for i, g in enumerate(sd["param_groups"]) for name in g["params"]}
    named = list(module.named_parameters())
    module_order = {name: i for i, (name, _) in enumerate(named)}
    stages = {name: (stage_of or {}).get(id(p), stage) for name, p in named}
    # a tied copy's position is its first user's, written by the rank that holds the weight under that name
    elsewhere = set(tied.values()) - set(module_order)
    position = {name: [stages.get(name, stage), module_order.get(name, -1)] for name in group_of
                if name not in elsewhere}
    state = {tied.get(name, name): value for name, value in sd["state"].items()}
    return {"state": state, "group_of": group_of, "groups": groups, "position": position}


def _staging_path(path: Path) -> Path:
    # a hidden sibling whose name does not contain the checkpoint's (Lightning finds "last" checkpoints by name)
    return path.parent / f".merak-partial-{hashlib.sha1(path.name.encode()).hexdigest()[:16]}"


def _check_replaceable(path: Path) -> None:
    if path.is_dir() and not is_sharded_checkpoint(path) and any(path.iterdir()):
        raise CheckpointError(f"{path} exists and is not a complete Merak checkpoint (no {COMPLETE_FILE}): "
                              "MerakStrategy does not overwrite it. Move it away or choose another checkpoint path.")


def save_sharded(path: Path, checkpoint: dict[str, Any], module: torch.nn.Module, optimizers: list[Any],
                 is_rank_zero: bool, stage: int = 0, stage_of: dict[int, int] | None = None,
                 tied: dict[str, str] | None = None) -> None:
    """Write ``checkpoint`` (Lightning's dict) as a DCP folder; weights and optimizer state come from the live
    module and optimizers so each rank contributes exactly what it holds. Every rank calls this. ``tied``: this
    rank's names of tied-weight copies -> the one-process name their optimizer state is stored under.

    Atomic (see module docstring): a failure on any rank leaves the previous checkpoint at ``path`` untouched
    and the partial one in a hidden sibling folder, which the next save to ``path`` clears."""
    _check_replaceable(path)  # on every rank (same file system), so a refusal does not leave peers waiting
    staging = _staging_path(path)
    failures.rank_local(lambda: shutil.rmtree(staging) if staging.exists() else None,
                        "clearing an earlier partial save", runs=is_rank_zero)
    staging.mkdir(parents=True, exist_ok=True)
    checkpoint = dict(checkpoint)
    checkpoint.pop("state_dict", None)
    checkpoint.pop("optimizer_states", None)
    state: dict[str, Any] = {"state_dict": get_model_state_dict(module)}
    for i, opt in enumerate(optimizers):
        state[f"optimizer_{i}"] = _optimizer_entry(module, opt, stage, stage_of, tied)
    dcp.save(state, checkpoint_id=staging, no_dist=not _distributed_is_initialized())  # returns once all wrote

    def finish() -> None:
        torch.save(checkpoint, staging / META_FILE)
        _write_synced(staging / COMPLETE_FILE, json.dumps(FORMAT).encode())
        _replace(staging, path)

    # rank 0 alone finishes the folder while the others wait: a failure there (an unpicklable entry, a full disk)
    # is raised on every rank at once instead of leaving them in the barrier
    failures.rank_local(finish, "writing the checkpoint's meta.pt", runs=is_rank_zero)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace(staging: Path, path: Path) -> None:
    """Give the complete ``staging`` folder the name ``path``; the old checkpoint is removed only afterwards."""
    old = None
    if path.is_symlink() or path.is_file():  # save_last="link" makes last.ckpt a link
        path.unlink()
    elif path.is_dir():
        old = staging.with_name(staging.name + "-old")
        if old.exists():
            shutil.rmtree(old)
        path.rename(old)
    staging.rename(path)
    if old is not None:
        shutil.rmtree(old)


def load(path: Path, module: torch.nn.Module, optimizers: list[Any], strict: bool = True,
         weights_only: bool | None = None, tied: dict[str, str] | None = None) -> dict[str, Any]:
    """Load a sharded folder (any topology) or a plain ``.ckpt`` file into this rank's module and optimizers;
    return the remaining Lightning checkpoint entries (loops, callbacks, ...). ``weights_only=False`` means the
    caller trusts the checkpoint (its pickles may run code); ``None`` and ``True`` load data only. ``tied``: as
    for ``save_sharded``, this rank's tied copies read the state stored under their one-process name."""
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    if not path.is_dir():
        return _load_full_file(path, module, optimizers, strict, weights_only, tied or {})
    _check_complete(path)
    # read the non-tensor files before any collective, so a bad file fails every rank at once, by name
    meta = _load_torch_file(path / META_FILE, weights_only)
    model_sd = get_model_state_dict(module)
    _check_tensors_match(path, read_dcp_metadata(path), model_sd, strict)
    state: dict[str, Any] = {"state_dict": model_sd}
    templates = [_optimizer_entry(module, opt, tied=tied) for opt in optimizers]
    for i, entry in enumerate(templates):
        state[f"optimizer_{i}"] = entry
    reader, planner = _reader_and_planner(path, weights_only)
    _dcp_load(dcp.load, state, storage_reader=reader, planner=planner, no_dist=not _distributed_is_initialized())
    set_model_state_dict(module, state["state_dict"], options=StateDictOptions(strict=strict))
    for i, opt in enumerate(optimizers):
        _restore_optimizer(module, opt, state[f"optimizer_{i}"], tied or {})
    return meta


def _check_tensors_match(path: Path, metadata: Metadata, model_sd: dict[str, Any], strict: bool) -> None:
    """Before any tensor is read: the module's names and (global) shapes against the checkpoint's, naming the
    first mismatch."""
    saved = {k[len("state_dict."):]: md for k, md in metadata.state_dict_metadata.items()
             if k.startswith("state_dict.")}
    for name, t in model_sd.items():
        if name not in saved:
            if strict:
                raise CheckpointError(f"{path} has no tensor `{name}` that this module holds (it has {len(saved)} "
                                      "model tensors). It was saved from another model; pass a matching checkpoint, or "
                                      "set `strict_loading = False` on the LightningModule to load what matches.")
            continue
        size = tuple(getattr(saved[name], "size", ()))
        if size != tuple(t.shape):
            raise CheckpointError(f"{path}: tensor `{name}` has shape {list(size)} in the checkpoint but "
                                  f"{list(t.shape)} in this module. It was saved from a model of another size.")


def _restore_optimizer(module: torch.nn.Module, optimizer: Any, entry: dict[str, Any],
                       tied: dict[str, str]) -> None:
    """Give ``optimizer`` the name-keyed ``entry``; a tied copy on this rank takes its one-process name's state."""
    opt = _unwrap(optimizer)
    local = {name: alias for alias, name in tied.items()}
    names = list(entry["group_of"].keys())
    groups = []
    for i, hyper in enumerate(entry["groups"]):
        groups.append({**hyper, "params": [local.get(n, n) for n in names if entry["group_of"][n] == i]})
    state = {local.get(n, n): s for n, s in entry.get("state", {}).items()}
    set_optimizer_state_dict(module, opt, {"state": state, "param_groups": groups})


def _load_full_file(path: Path, module: torch.nn.Module, optimizers: list[Any], strict: bool,
                    weights_only: bool | None, tied: dict[str, str]) -> dict[str, Any]:
    """A consolidated (or plain Lightning) checkpoint: full tensors keyed by name; optimizer state by position."""
    checkpoint = _load_torch_file(path, weights_only)
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
        _restore_optimizer(module, opt, _restrict(named, {tied.get(k, k) for k in local}), tied)
    return {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}


def _restrict(entry: dict[str, Any], local: set[str]) -> dict[str, Any]:
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


def consolidate(folder: Path, output: Path, weights_only: bool | None = None) -> Path:
    """Merge a sharded folder into one ordinary Lightning checkpoint file (full tensors, positional optimizer
    state), loadable with ``MyModule.load_from_checkpoint`` and resumable with ``trainer.fit(ckpt_path=...)``.
    ``weights_only=False``: the folder is trusted (see ``load``)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a Merak sharded checkpoint (a folder with {COMPLETE_FILE}).")
    _check_complete(folder)
    meta = _load_torch_file(folder / META_FILE, weights_only)
    if weights_only is not False:
        read_dcp_metadata(folder)
    reader, planner = _reader_and_planner(folder, weights_only, everything=True)
    raw = _dcp_load(dcp_load_everything, folder, storage_reader=reader, planner=planner)
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
    partial = output.with_name(f".{output.name}.partial")  # complete or absent, like the folders
    torch.save(out, partial)
    os.replace(partial, output)
    return output


def check_removable(path: Path) -> None:
    """Only what Merak wrote may be deleted: a complete sharded folder, a file or a link."""
    if path.is_dir() and not path.is_symlink() and not is_sharded_checkpoint(path):
        raise CheckpointError(f"refusing to delete {path}: it is a folder without {COMPLETE_FILE}, so not a "
                              "checkpoint MerakStrategy wrote. Delete it yourself if it should go.")


def remove(path: Path) -> None:
    """Delete a checkpoint Merak wrote (see ``check_removable``); any other folder is refused."""
    check_removable(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
