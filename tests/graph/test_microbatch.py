"""Micro-batch splitting of any batch type: one micro-batch is the batch itself, PyG batches split by graph with
PyG's own functions, other classes plug in through ``register_batch_split``; a full graph gets an error that
says what to set."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lightning_merak import register_batch_split
from lightning_merak.pipeline.microbatch import _SPLITS, PipelineInputError, split_batch

pyg = pytest.importorskip("torch_geometric")
from torch_geometric.data import Batch, Data  # noqa: E402


def molecules(n: int, seed: int = 0) -> list[Data]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        nodes = 3 + i % 4
        edges = torch.randint(0, nodes, (2, 2 * nodes), generator=g)
        out.append(Data(x=torch.randn(nodes, 5, generator=g), edge_index=edges, y=torch.tensor([float(i)])))
    return out


def test_one_microbatch_is_the_batch_itself():
    """Nothing is inspected or split: full graphs, custom classes and nested structures pass through."""
    graph = Data(x=torch.randn(7, 3), edge_index=torch.tensor([[0, 1], [1, 2]]))
    full = Batch.from_data_list([graph])

    class Anything:
        pass

    for batch in (graph, full, Anything(), {"g": graph, "meta": ["a", 1]}, "text"):
        parts = split_batch(batch, 1)
        assert len(parts) == 1 and parts[0] is batch


def test_pyg_batch_splits_by_graph_with_pyg_functions():
    graphs = molecules(8)
    batch = Batch.from_data_list(graphs)
    parts = split_batch({"graph": batch, "weight": torch.arange(8.0), "note": "x"}, 4)
    for i, part in enumerate(parts):
        expected = Batch.from_data_list(graphs[2 * i:2 * i + 2])
        assert type(part["graph"]) is type(batch) and part["graph"].num_graphs == 2
        for key in ("x", "edge_index", "y", "batch", "ptr"):
            assert torch.equal(part["graph"][key], expected[key]), key
        assert part["weight"].tolist() == [2.0 * i, 2.0 * i + 1] and part["note"] == "x"
    # node features of consecutive graphs: the micro-batches' rows are the whole batch's, in order
    assert torch.equal(torch.cat([p["graph"].x for p in parts]), batch.x)


def test_full_graph_needs_one_microbatch():
    """A full-graph loader yields one graph (a Data, or a Batch of one): the error names what to set."""
    graph = Data(x=torch.randn(7, 3), edge_index=torch.tensor([[0, 1], [1, 2]]))
    for batch in (graph, Batch.from_data_list([graph])):
        with pytest.raises(PipelineInputError) as err:
            split_batch(batch, 4)
        message = str(err.value)
        assert "A batch of 1 graph cannot be split into 4 micro-batches" in message
        assert "num_microbatches=1" in message and "NeighborLoader" in message and "DataLoader" in message
    with pytest.raises(PipelineInputError, match="6 graphs does not split evenly into 4"):
        split_batch(Batch.from_data_list(molecules(6)), 4)


def test_registered_class_and_unknown_class():
    @dataclass
    class Sentences:
        tokens: list[torch.Tensor]

    register_batch_split(Sentences, size=lambda b: len(b.tokens),
                         split=lambda b, n: [Sentences(b.tokens[i::n]) for i in range(n)], unit="sentence")
    try:
        batch = Sentences([torch.arange(k) for k in range(1, 5)])
        parts = split_batch((batch, torch.zeros(4, 2)), 2)
        assert [len(t) for t in parts[0][0].tokens] == [1, 3] and parts[1][1].shape == (2, 2)
        with pytest.raises(PipelineInputError, match="A batch of 4 sentences cannot be split into 8"):
            split_batch(batch, 8)
    finally:
        del _SPLITS[Sentences]

    class Opaque:
        pass

    with pytest.raises(PipelineInputError, match=r"num_microbatches=1.*register_batch_split"):
        split_batch(Opaque(), 2)
