"""Boundary tensors of any layout leave a stage contiguous, copied only when they are not (one process)."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_merak.partition import plan_model
from lightning_merak.pipeline import stage as stage_module
from lightning_merak.pipeline.stage import build_stage
from tests.breadth.families import build


@pytest.mark.parametrize("copy_for_split_backward", [False, True])
def test_sendable_layouts(copy_for_split_backward):
    base = torch.randn(2, 3, 4, 5)
    for t in (base.permute(0, 2, 3, 1), base.contiguous(memory_format=torch.channels_last),
              torch.randn(1, 3, 1, 5).expand(2, 3, 4, 5), base):
        out = stage_module._sendable(t, copy_for_split_backward)
        assert out.is_contiguous() and torch.equal(out, t) and out is not t
        if t is base:  # already contiguous: a view, no copy (unless a split backward needs its own tensor)
            assert (out.data_ptr() == t.data_ptr()) != copy_for_split_backward


@pytest.mark.parametrize("name", ["t5", "convnext"])
def test_stage_outputs_are_contiguous_where_the_model_makes_views(name, monkeypatch):
    """T5's position bias is a permuted view, ConvNeXt's block output a permuted (channels-last) tensor."""
    model, batch = build(name)
    plan = plan_model(model, ((), batch), 2)
    raw = []
    sendable = stage_module._sendable
    monkeypatch.setattr(stage_module, "_sendable", lambda t, c: (raw.append(t.is_contiguous()), sendable(t, c))[1])
    outputs = build_stage(copy.deepcopy(model), plan, 0)(model_args=(), model_kwargs=batch)
    assert not all(raw)  # the model really hands over a non-contiguous tensor
    assert all(t.is_contiguous() for t in outputs)
