"""Every private torch / Lightning API the project uses is imported here, and only here.

The supported range is the one CI tests. Anything outside it fails at import with a message naming the
range, instead of an AttributeError deep inside a training step.
"""

from __future__ import annotations

import torch
from packaging.version import Version

TORCH_RANGE = ">=2.13,<2.14"
LIGHTNING_RANGE = ">=2.6,<2.7"


def _check_versions() -> None:
    import os

    import lightning

    if os.environ.get("LIGHTNING_MERAK_SKIP_VERSION_CHECK") == "1":  # benchmarks/gpu_check.sh on other torch builds
        return

    torch_v = Version(torch.__version__.split("+")[0])
    if not (Version("2.13") <= torch_v < Version("2.14")):
        raise ImportError(
            f"lightning_merak supports torch {TORCH_RANGE} (it uses private pipelining APIs); found {torch.__version__}. "
            "Install torch==2.13.* ."
        )
    light_v = Version(lightning.__version__)
    if not (Version("2.6") <= light_v < Version("2.7")):
        raise ImportError(
            f"lightning_merak supports lightning {LIGHTNING_RANGE}; found {lightning.__version__}. Install lightning==2.6.*"
        )


_check_versions()

# --- Lightning private pieces -------------------------------------------------------------------------
from lightning.fabric.utilities.distributed import (  # noqa: E402
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.optimizer import _optimizers_to_device  # noqa: E402
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher  # noqa: E402
from lightning.pytorch.trainer.states import TrainerFn  # noqa: E402
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten  # noqa: E402

# DCP's planner that loads every entry of a checkpoint (no template state dict)
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner  # noqa: E402

# batch-coupled layers (their common base class is private)
BATCH_NORM_TYPES = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


def dcp_load_everything(folder, storage_reader=None, planner=None) -> dict:
    """Read a whole DCP folder into memory without a process group (torch offers this only privately).
    ``storage_reader`` / ``planner``: replacements for DCP's (an ``_EmptyStateDictLoadPlanner`` subclass)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=storage_reader or FileSystemReader(folder),
                     planner=planner or _EmptyStateDictLoadPlanner(), no_dist=True)
    return state


def dataloader_for(trainer) -> object:
    """The dataloader(s) the running Trainer function will iterate (Lightning keeps the source privately)."""
    fn = trainer.state.fn
    loop = {TrainerFn.FITTING: trainer.fit_loop, TrainerFn.VALIDATING: trainer.validate_loop,
            TrainerFn.TESTING: trainer.test_loop, TrainerFn.PREDICTING: trainer.predict_loop}[fn]
    return loop._data_source.dataloader()


def configured_optimizers(lightning_module) -> list:
    """The optimizers ``configure_optimizers`` returns, in any of its return forms (Lightning's parser is
    private); the schedulers it makes are dropped."""
    from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers

    return list(_init_optimizers_and_lr_schedulers(lightning_module)[0])


def reset_optimizers(strategy) -> None:
    """Forget the optimizers and schedulers of an earlier setup (Lightning's Strategy keeps this private)."""
    strategy._reset_optimizers_and_schedulers()


def install_clip_grad_by_norm(precision, clip) -> None:
    """Route Lightning's ``gradient_clip_val`` (norm) through ``clip(optimizer, clip_val)``. Lightning has no hook
    for the norm's reduction across model shards, so the precision plugin's method is replaced on the instance;
    once per plugin."""
    if getattr(precision, "_merak_clipping", False):
        return
    precision.clip_grad_by_norm = clip
    precision._merak_clipping = True


def skip_lightning_backward(trainer) -> None:
    """Lightning's automatic optimisation must not run backward or zero_grad: the pipeline schedule did both
    (the loop's flag is private; StochasticWeightAveraging uses it the same way)."""
    trainer.fit_loop._skip_backward = True


def metric_state(metric) -> dict:
    """A torchmetrics Metric's accumulated state (torchmetrics keeps the list of state names privately)."""
    return {name: getattr(metric, name) for name in metric._defaults}


def load_metric_state(metric, state: dict) -> None:
    """Give ``metric`` another instance's accumulated state, so its ``compute()`` gives the same value."""
    for name, value in state.items():
        setattr(metric, name, value)
    metric._update_count = max(metric._update_count, 1)
    metric._computed = None


__all__ = [
    "dcp_load_everything",
    "_EmptyStateDictLoadPlanner",
    "dataloader_for",
    "skip_lightning_backward",
    "reset_optimizers",
    "install_clip_grad_by_norm",
    "metric_state",
    "load_metric_state",
    "_distributed_is_initialized",
    "_get_default_process_group_backend_for_device",
    "_init_dist_connection",
    "_sync_ddp_if_available",
    "_optimizers_to_device",
    "_SubprocessScriptLauncher",
    "TrainerFn",
    "tree_flatten",
    "tree_leaves",
    "tree_map",
    "tree_unflatten",
]

# --- tensor parallel ----------------------------------------------------------------------------------
# Per-head sharding of fused q|k|v weights: each rank holds the same head slice of q, of k and of v.
from torch.distributed.tensor.placement_types import _StridedShard  # noqa: E402

__all__ += ["_StridedShard"]

# --- pipeline runtime ---------------------------------------------------------------------------------
# The action-list runtime and its IR are underscore-private in torch 2.13 (moving to pipelining/runtime.py).
from torch.distributed.pipelining.schedules import _Action  # noqa: E402
from torch.distributed.pipelining.schedules import _add_send_recv  # noqa: E402
from torch.distributed.pipelining.schedules import _ComputationType  # noqa: E402
from torch.distributed.pipelining.schedules import _PipelineContext  # noqa: E402
from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime  # noqa: E402
from torch.distributed.pipelining.schedules import _ScheduleForwardOnly  # noqa: E402
from torch.distributed.pipelining.schedules import _wait_batch_p2p  # noqa: E402
from torch.distributed.pipelining.stage import _normalize_model_output_as_tuple  # noqa: E402

__all__ += ["_Action", "_add_send_recv", "_ComputationType", "_PipelineContext", "_PipelineScheduleRuntime",
            "_ScheduleForwardOnly", "_wait_batch_p2p", "_normalize_model_output_as_tuple"]

# --- module hooks -------------------------------------------------------------------------------------
# nn.Module keeps its forward hooks in private dicts; a deep copy (the proxy capture's meta twin) would copy
# them and the objects they close over (RNG streams, DELTA), so the copy maps them to empty dicts instead.
_FORWARD_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                       "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
                       "_backward_hooks")


def hook_free_memo(module: torch.nn.Module) -> dict[int, object]:
    """A ``copy.deepcopy`` memo under which ``module``'s copy carries none of its forward/backward hooks."""
    memo: dict[int, object] = {}
    for sub in module.modules():
        for name in _FORWARD_HOOK_DICTS:
            hooks = sub.__dict__.get(name)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()
    return memo


def has_forward_hooks(module: torch.nn.Module) -> bool:
    """Whether ``module`` has forward hooks of its own (a private dict): a value it returns may be collected by
    one (transformers' output recorders: router logits, hidden states) and read outside the block that ran it."""
    return bool(module._forward_hooks)


__all__ += ["hook_free_memo", "has_forward_hooks"]

# --- module state surgery -----------------------------------------------------------------------------
# A pipeline stage keeps blocks of other stages as structure only. nn.Module has no public way to turn a
# registered parameter or buffer into a plain attribute, so its private stores are edited here.


def strip_module_state(unit: torch.nn.Module) -> None:
    """Make a block of another stage hold no state: parameters and buffers become plain meta tensors, so they
    leave parameters()/state_dict() while code that reads e.g. ``block.weight.dtype`` still works."""
    for sub in unit.modules():
        for store in (sub._parameters, sub._buffers):
            for name, t in list(store.items()):
                del store[name]
                if t is not None:
                    object.__setattr__(sub, name, t.detach().to("meta"))


def parameter_slots(module: torch.nn.Module) -> dict:
    """A module's own registered parameters by attribute name (nn.Module's private store; None slots too).
    Assigning into it replaces a parameter without re-registering (materialisation, re-tying)."""
    return module._parameters


def buffer_slots(module: torch.nn.Module) -> dict:
    """A module's own registered buffers by attribute name (nn.Module's private store)."""
    return module._buffers


def tensor_parallel_mesh(module: torch.nn.Module) -> object | None:
    """The device mesh of a module whose output torch's tensor-parallel styles convert (a forward hook from
    ``torch.distributed.tensor``, which expects a DTensor output), or None."""
    hooked = any(getattr(h, "__module__", "").startswith("torch.distributed.tensor")
                 for h in module._forward_hooks.values())
    if not hooked:
        return None
    return next((p.device_mesh for p in module.parameters(recurse=False) if hasattr(p, "device_mesh")), None)


def is_view_of_parameter(t: torch.Tensor) -> bool:
    """Whether ``t`` is a view of a parameter (nn.Linear saves its weight's transpose): it owns no memory."""
    return isinstance(t._base, torch.nn.Parameter)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (tensor parallel), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def version_counter(t: torch.Tensor) -> int:
    """Autograd's in-place version counter (private): a saved or swapped tensor modified in place since."""
    return t._version


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The torch optimizer inside Lightning's ``LightningOptimizer`` wrapper (kept in a private attribute)."""
    return getattr(optimizer, "_optimizer", optimizer)


__all__ += ["strip_module_state", "parameter_slots", "buffer_slots", "local_shard", "version_counter", "unwrap_optimizer"]


def without_output_capturing_flag(copy: torch.nn.Module) -> torch.nn.Module:
    """transformers 5 installs its output-recording hooks (router logits, hidden states) once per model, at the
    first forward that asks for them, and marks the model with a private flag. A hook-free copy of a model that has
    run carries the flag without the hooks; clearing it lets the copy install its own."""
    for sub in copy.modules():
        sub.__dict__.pop("_output_capturing_hooks_installed", None)
    return copy


__all__ += ["without_output_capturing_flag"]


# --- transformers and nn.MultiheadAttention private pieces ---------------------------------------------


def hf_init_weights(model, module: torch.nn.Module) -> None:
    """A transformers model's own init of one submodule (``PreTrainedModel._init_weights``: what ``post_init``
    applies module by module), for tensors materialised from the meta device."""
    model._init_weights(module)


def mha_packed_in_projection(module: torch.nn.MultiheadAttention) -> bool:
    """Whether an ``nn.MultiheadAttention`` keeps q, k and v in one packed ``in_proj_weight`` (a private flag)."""
    return bool(module._qkv_same_embed_dim)


__all__ += ["hf_init_weights", "mha_packed_in_projection"]


# --- process groups alive in this process (torch lists them only privately) ----------------------------------
def live_process_groups() -> list:
    """Every process group torch still holds in this process (the default one included)."""
    from torch.distributed import distributed_c10d

    return list(distributed_c10d._world.pg_map)


# --- materialisation (the storage identity of meta tensors; glibc's heap) ----------------------------
def storage_key(t: torch.Tensor) -> int:
    """One number per storage, the same for every alias of it (``.data``, ``detach()``), meta tensors included
    (whose data pointers are all 0): the storage object's private handle."""
    return t.untyped_storage()._cdata


def release_freed_host_memory() -> None:
    """Hand pages that host ``free()`` kept in the process heap back to the system (glibc's ``malloc_trim``), so a
    burst of temporaries (materialisation) does not stay resident. A no-op where the C library has none."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        pass


# a dispatch mode sees every aten op (materialisation of tensor-parallel shards carries init ops onto them)
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

__all__ += ["storage_key", "release_freed_host_memory", "TorchDispatchMode"]
