"""Item 9: bad input gives a clear error."""

from __future__ import annotations

import re

import pytest

from lightning_merak.config import MerakConfig, MerakConfigError
from lightning_merak.memory import DeltaScheduler


def test_budget_below_minimum_names_the_minimum(zoo):
    base = zoo.build("gpt2")
    model = zoo.copy(base)
    params = zoo.param_bytes(model)
    delta = DeltaScheduler(model, memory_budget=2 * params + 1000, profile_steps=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(MerakConfigError, match=r"below the minimum of \d+ bytes \(\d+\.\d [KMG]?i?B\)") as err:
        zoo.train(model, "gpt2", delta, steps=1)
    assert all((p == before[n]).all() for n, p in model.named_parameters())  # raised before any update
    delta.close()
    minimum = int(re.search(r"at least (\d+)", str(err.value)).group(1))
    assert 2 * params < minimum < 2 * params + zoo.saved_bytes(zoo.copy(base), "gpt2")
    model = zoo.copy(base)
    delta = DeltaScheduler(model, memory_budget=minimum, profile_steps=1)
    stats = zoo.train(model, "gpt2", delta, steps=2)  # the minimum itself is accepted and holds
    assert stats[-1][3]["delta/peak_bytes"] <= minimum - 2 * params
    delta.close()


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", "-1GiB", 0, True])
def test_unparsable_budget(zoo, bad):
    with pytest.raises(MerakConfigError, match="memory_budget"):
        DeltaScheduler(zoo.build("gpt2"), memory_budget=bad)


def test_budget_without_memory_manager():
    with pytest.raises(MerakConfigError, match="memory_manager='delta'"):
        MerakConfig(memory_budget="1GiB", recompute="none")


def test_string_budget_is_parsed(zoo):
    delta = DeltaScheduler(zoo.build("gpt2"), memory_budget="1.5GiB")
    assert delta.ledger.budget_bytes == int(1.5 * 2**30)
    delta.close()


def test_replay_refuses_an_input_modified_in_place():
    """A recomputed call whose input changed in place after the call would replay on other data: an error."""
    import torch
    from torch import nn

    from lightning_merak.memory.planner import Plan

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop = nn.Linear(32, 32), nn.Dropout(0.5)

        def forward(self, x):
            h = self.lin(x)
            d = self.drop(h)  # saves only its mask: h itself is not saved for backward
            h.add_(1.0)
            return d * 2 + h

    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(Block(), Block()))  # the inner Sequential holds the layers
    delta = DeltaScheduler(model, memory_budget=10 * 2**30, profile_steps=1)
    x = torch.randn(64, 32, requires_grad=True)
    with delta.forward():
        loss = model(x).sum()
    loss.backward()
    delta.end_step()
    drop = next(i for i, (name, _) in enumerate(delta.segments) if name == "0.0.drop")
    (signature,) = delta.plans
    delta.plans[signature] = Plan(recompute={(drop, 0)})  # replay block 0's dropout alone
    with delta.forward():
        loss = model(x).sum()
    with pytest.raises(RuntimeError, match="Dropout was modified in place"):
        loss.backward()
    delta.close()
