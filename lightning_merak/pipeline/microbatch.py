"""Micro-batches: how a pipeline splits one batch, for any batch type.

- One micro-batch is the batch itself, untouched: any batch (a full graph, a custom class) runs under a
  pipeline with ``num_microbatches=1``, and nothing is ever split without a pipeline.
- Tensors, also nested in lists, tuples and dicts (torch's pytree), are split along dim 0 into equal parts;
  other leaves are replicated.
- A batch object whose class is registered with ``register_batch_split`` is split by its own rule. A
  torch_geometric ``Batch`` of many graphs is registered: it splits by graph, with PyG's own ``index_select``
  and ``Batch.from_data_list``; a single graph (``Data``, or a ``Batch`` of one) is one sample.

Parts hold equal numbers of samples. Their tensors may still differ in size (graphs of different node counts):
the stages then exchange buffers of the widest micro-batch's shapes, padded and cut (``takeover.StageRunner``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lightning_merak._compat import tree_flatten, tree_map


class PipelineInputError(RuntimeError):
    """The batch or the step cannot be pipelined; the message says why and what to do."""


@dataclass(frozen=True)
class BatchSplit:
    """How to split objects of one batch class: ``size(batch)`` counts its samples, ``split(batch, n)`` returns
    ``n`` batches of the same class holding consecutive, equal shares of them. ``unit`` names a sample in
    errors ("graph"); ``advice`` says what to do when a batch holds too few."""

    size: Callable[[Any], int]
    split: Callable[[Any, int], list[Any]]
    unit: str = "sample"
    advice: str = ""


_SPLITS: dict[type, BatchSplit] = {}


def register_batch_split(batch_type: type, *, size: Callable[[Any], int], split: Callable[[Any, int], list[Any]],
                         unit: str = "sample", advice: str = "") -> None:
    """Teach the pipeline to micro-batch a batch class it cannot see into (subclasses included), e.g.::

        register_batch_split(MyGraphBatch, size=lambda b: b.num_graphs,
                             split=lambda b, n: [MyGraphBatch.merge(p) for p in chunks(b.graphs, n)], unit="graph")

    ``split`` is called only with an ``n`` that divides ``size(batch)``."""
    _SPLITS[batch_type] = BatchSplit(size, split, unit, advice)


def _split_rule(obj: Any) -> BatchSplit | None:
    if "torch_geometric" in sys.modules and not _pyg_registered:
        _register_torch_geometric()  # a PyG batch exists only once PyG is imported: no import of our own
    for cls in type(obj).__mro__:
        if cls in _SPLITS:
            return _SPLITS[cls]
    return None


def _leaves(batch: Any) -> list[Any]:
    return [leaf for leaf in tree_flatten(batch)[0]
            if _split_rule(leaf) is not None or (isinstance(leaf, torch.Tensor) and leaf.dim() > 0)]


def batch_size_of(batch: Any) -> int:
    """Samples in the batch: the leading size of its first tensor, or what a registered batch class counts."""
    leaves = _leaves(batch)
    if not leaves:
        raise PipelineInputError(
            f"The batch ({type(batch).__name__}) holds no tensor with a batch dimension and no object of a class with "
            "a registered split, so it cannot be split into micro-batches. Set MerakStrategy(num_microbatches=1) "
            "to pipeline the whole batch as one micro-batch, or teach the pipeline how to split it with "
            "lightning_merak.register_batch_split(YourBatchClass, size=..., split=...)."
        )
    return _size(leaves[0])


def _size(leaf: Any) -> int:
    rule = _split_rule(leaf)
    return rule.size(leaf) if rule is not None else leaf.shape[0]


def split_batch(batch: Any, num_microbatches: int) -> list[Any]:
    """``num_microbatches`` equal parts of ``batch``: every tensor with the batch's leading size split along dim
    0, every registered batch object of that size split by its rule, other leaves replicated. One part is
    ``batch`` itself."""
    if num_microbatches == 1:
        return [batch]
    leaves = _leaves(batch)
    size = batch_size_of(batch)
    rule = _split_rule(leaves[0])
    unit = rule.unit if rule is not None else "sample"
    if size < num_microbatches:
        advice = f" {rule.advice}" if rule is not None and rule.advice else ""
        raise PipelineInputError(
            f"A batch of {size} {unit}{'s' if size != 1 else ''} cannot be split into {num_microbatches} "
            f"micro-batches. Increase the batch size to at least {num_microbatches} or lower "
            f"MerakStrategy(num_microbatches=...).{advice}"
        )
    if size % num_microbatches:
        raise PipelineInputError(
            f"A batch of {size} {unit}s does not split evenly into {num_microbatches} micro-batches; use a batch "
            f"size that is a multiple of num_microbatches (or drop_last=True in the DataLoader)."
        )
    objects = {id(leaf): _split_rule(leaf).split(leaf, num_microbatches) for leaf in leaves
               if _split_rule(leaf) is not None and _size(leaf) == size}

    def chunk(t: Any, i: int) -> Any:
        if id(t) in objects:
            return objects[id(t)][i]
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == size:
            return t.tensor_split(num_microbatches)[i]
        return t

    return [tree_map(lambda t, i=i: chunk(t, i), batch) for i in range(num_microbatches)]


# ---------------------------------------------------------------------------------------- torch_geometric
_pyg_registered = False

GRAPH_ADVICE = (
    "A full graph is one sample: set MerakStrategy(num_microbatches=1) to pipeline it whole (with "
    "torch_geometric.loader.NeighborLoader for a graph too large for that: each sampled subgraph is again one "
    "micro-batch), or load mini-batches of many graphs (torch_geometric.loader.DataLoader), which are "
    "micro-batched by graph."
)


def _register_torch_geometric() -> None:
    global _pyg_registered
    _pyg_registered = True
    from torch_geometric.data import Batch, Data, HeteroData

    def split_graphs(batch: Any, n: int) -> list[Any]:
        per = batch.num_graphs // n
        return [Batch.from_data_list(batch.index_select(range(i * per, (i + 1) * per))) for i in range(n)]

    register_batch_split(Batch, size=lambda b: b.num_graphs, split=split_graphs, unit="graph", advice=GRAPH_ADVICE)
    for single in (Data, HeteroData):  # one graph: nothing to split it into
        register_batch_split(single, size=lambda g: 1, split=lambda g, n: [g], unit="graph", advice=GRAPH_ADVICE)
