"""Tensor parallelism: TP plans (transformers' own or auto-detected), sub-tensor overlap styles, clipping.

Composed in order by the strategy::

    plan = tp_plan_for(model, tp_size)                       # pure: FQN -> style, printable with .table()
    apply_tensor_parallel(model, mesh["tp"], plan, subtensor_chunks=2)
    ...
    clip_grad_norm_(model.parameters(), max_norm, [mesh["pp"].get_group(), mesh["tp"].get_group()])
"""

from lightning_merak.tensor_parallel.apply import apply_tensor_parallel
from lightning_merak.tensor_parallel.checkpoint import make_optimizer_checkpointable
from lightning_merak.tensor_parallel.clip import clip_grad_norm_
from lightning_merak.tensor_parallel.plan import STYLES, TPPlan, tp_plan_for
from lightning_merak.tensor_parallel.styles import ColumnParallel, MultiheadAttentionParallel, RowParallel

__all__ = ["STYLES", "ColumnParallel", "MultiheadAttentionParallel", "RowParallel", "TPPlan",
           "apply_tensor_parallel", "clip_grad_norm_", "make_optimizer_checkpointable", "tp_plan_for"]
