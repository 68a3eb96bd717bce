"""DELTA memory management: per saved activation, keep it, swap it out and prefetch it, or recompute it.

Budget semantics. ``memory_budget`` is per device and covers the parameters, their gradients and the saved
activations (tensors autograd keeps for backward). The *activation allowance* is
``budget - 2 * parameter bytes``; optimizer state, input batches and transient workspace are outside it.
When several forwards are in flight before their backward (pipeline micro-batches), they share the
allowance equally. At the end of the first profiling step the budget is checked against the minimum, two
times the parameter bytes plus the saved bytes of the largest layer (a recompute segment: the innermost
repeated block, e.g. a transformer layer); below it a ``MerakConfigError`` gives the minimum in bytes and
GiB, before any optimizer step has changed the weights.

Standalone use::

    delta = DeltaScheduler(model, memory_budget="2GiB")
    for x, y in data:
        with delta.forward():
            loss = loss_fn(model(x), y)
        loss.backward()
        metrics = delta.end_step()   # {"delta/kept_bytes": ..., "delta/peak_bytes": ..., ...}
    print(delta.ledger.summary_table())
"""

from lightning_merak.memory.ledger import MemoryLedger
from lightning_merak.memory.planner import Plan, plan_forward
from lightning_merak.memory.profiler import ForwardProfile, find_segments, segment_tree
from lightning_merak.memory.scheduler import DeltaScheduler
from lightning_merak.memory.swap import FileSwapTier, PinnedSwapTier, SwapTier

__all__ = [
    "DeltaScheduler",
    "FileSwapTier",
    "ForwardProfile",
    "MemoryLedger",
    "PinnedSwapTier",
    "Plan",
    "SwapTier",
    "find_segments",
    "segment_tree",
    "plan_forward",
]
