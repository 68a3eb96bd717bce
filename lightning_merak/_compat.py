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
    import lightning

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
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher  # noqa: E402
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher  # noqa: E402
from lightning.pytorch.trainer.states import TrainerFn  # noqa: E402


def dcp_load_everything(folder) -> dict:
    """Read a whole DCP folder into memory without a process group (torch offers this only privately)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state


__all__ = [
    "dcp_load_everything",
    "_distributed_is_initialized",
    "_get_default_process_group_backend_for_device",
    "_init_dist_connection",
    "_sync_ddp_if_available",
    "_MultiProcessingLauncher",
    "_SubprocessScriptLauncher",
    "TrainerFn",
]

# --- tensor parallel ----------------------------------------------------------------------------------
# Per-head sharding of fused q|k|v weights: each rank holds the same head slice of q, of k and of v.
from torch.distributed.tensor.placement_types import _StridedShard  # noqa: E402

__all__ += ["_StridedShard"]
