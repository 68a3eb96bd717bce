"""torchmetrics sync over the data-parallel group only: pipeline and tensor-parallel peers hold the same metric
state (replayed from the last stage, or computed alike), so syncing over the world would count every sample once
per peer (wrong for list states such as retrieval: examples/structure_text_retrieval.py at pp=2 reported recall@5
0.355 instead of one process's 0.5625)."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric
from torchmetrics.retrieval import RetrievalRecall

from lightning_merak import topology


def test_metrics_sync_over_the_given_group_unless_the_user_chose_one():
    dp_group, users_group = object(), object()
    module = torch.nn.Module()
    module.head = torch.nn.Module()
    module.head.recall = RetrievalRecall(top_k=2)
    module.mean = MeanMetric(process_group=users_group)
    topology.sync_metrics_over(module, dp_group)
    assert module.head.recall.process_group is dp_group
    assert module.mean.process_group is users_group
