"""One forward-interception helper: layers compose in a fixed order whatever the install order, and go away."""

from __future__ import annotations

import torch
from torch import nn

from lightning_merak.intercept import wrap_forward


def _tagging(tag: str, calls: list):
    def wrapper(inner):
        def forward(*args, **kwargs):
            calls.append(tag)
            return inner(*args, **kwargs)
        return forward
    return wrapper


def test_layers_nest_by_name_not_by_install_order_and_removal_restores_the_module():
    module = nn.Linear(2, 2)
    x = torch.randn(1, 2)
    expected = module(x)
    calls: list[str] = []
    takeover = wrap_forward(module, "takeover", _tagging("takeover", calls))  # installed first
    stage = wrap_forward(module, "stage", _tagging("stage", calls))
    memory = wrap_forward(module, "memory", _tagging("memory", calls))
    assert torch.equal(module(x), expected)
    assert calls == ["takeover", "memory", "stage"]  # outermost first: takeover, then DELTA, then the dispatch
    memory.remove()
    calls.clear()
    module(x)
    assert calls == ["takeover", "stage"]
    takeover.remove()
    stage.remove()
    stage.remove()  # idempotent
    assert "forward" not in module.__dict__ and not any(k.startswith("_merak") for k in module.__dict__)


def test_an_instance_forward_set_before_is_kept_as_the_base():
    module = nn.Identity()
    module.forward = lambda x: x + 1
    wrap = wrap_forward(module, "stage", lambda inner: (lambda x: inner(x) * 10))
    assert module(torch.tensor(1.0)) == 20
    wrap.remove()
    assert module(torch.tensor(1.0)) == 2


def test_delta_detaches_and_attaches_again():
    from lightning_merak.memory import DeltaScheduler

    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
    delta = DeltaScheduler(model, memory_budget=10**9)
    assert any("forward" in m.__dict__ for m in model.modules())
    delta.close()
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules())
    delta.attach()
    with delta.forward():
        loss = model(torch.randn(4, 8)).sum()
    loss.backward()
    delta.end_step()
    delta.close()
