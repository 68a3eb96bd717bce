"""Per-shape state stays bounded: batches padded to their own length bring a new input shape each, and neither a
stage's proxy captures nor DELTA's plans and profiles may grow with every shape a run ever saw (one process)."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_merak.memory import DeltaScheduler
from lightning_merak.memory.scheduler import PLAN_CACHE
from lightning_merak.partition import plan_model
from lightning_merak.pipeline.stage import build_stage
from lightning_merak.trace import shape_signature
from lightning_merak.trace.capture import CAPTURE_CACHE, ShapeCache
from tests.helpers.pipeline_models import build_hf

LENGTHS = list(range(4, 16))  # 12 shapes, more than either cache holds


def _batch(length: int) -> dict:
    ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(length))
    return {"input_ids": ids, "labels": ids}


def test_shape_cache_drops_the_least_recently_used():
    cache: ShapeCache[str] = ShapeCache(3)
    for key in "abc":
        cache[(key,)] = key
    assert cache[("a",)] == "a"  # a read makes it the most recent: b is now the oldest
    cache[("d",)] = "d"
    assert list(cache) == [("c",), ("a",), ("d",)] and ("b",) not in cache
    assert cache.get(("b",)) is None and cache.setdefault(("e",), "e") == "e"
    assert list(cache.values()) == ["a", "d", "e"]  # iterating does not reorder
    with pytest.raises(ValueError, match="at least one entry"):
        ShapeCache(0)


def test_stage_keeps_the_captures_of_recent_shapes_only():
    model = build_hf("gpt2")
    plan = plan_model(model, ((), _batch(8)), 2)
    stage = build_stage(copy.deepcopy(model), plan, 1)
    metas = {}
    for length in LENGTHS:
        recv, _ = stage.boundary_metas((), _batch(length))
        metas[length] = tuple(t.shape for t in recv)
    assert len(stage._signatures) == CAPTURE_CACHE == 8
    assert list(stage._signatures) == [shape_signature((), _batch(n)) for n in LENGTHS[-CAPTURE_CACHE:]]
    # an evicted shape is captured again, the same as before
    recv, _ = stage.boundary_metas((), _batch(LENGTHS[0]))
    assert tuple(t.shape for t in recv) == metas[LENGTHS[0]] == ((2, LENGTHS[0], 32),)


def test_delta_keeps_the_plans_of_recent_shapes_only():
    torch.manual_seed(0)
    model = build_hf("gpt2")
    reference = copy.deepcopy(model)
    budget = 2 * sum(p.numel() * p.element_size() for p in model.parameters()) + 300_000
    delta = DeltaScheduler(model, memory_budget=budget, profile_steps=1)
    for length in LENGTHS + LENGTHS[:2]:  # the first two shapes come back after being dropped: profiled anew
        for m in (model, reference):
            m.zero_grad(set_to_none=True)
        with delta.forward():
            model(**_batch(length)).loss.backward()
        delta.end_step()
        reference(**_batch(length)).loss.backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), (length, name)  # managed gradients stay the unmanaged ones
    assert len(delta.plans) == len(delta.profiles) == PLAN_CACHE == 8
    recent = LENGTHS[-(PLAN_CACHE - 2):] + LENGTHS[:2]
    assert sorted(key[0][0][1] for key in delta.plans) == sorted(recent)  # (input_ids shape (2, length), ...)
    delta.close()
