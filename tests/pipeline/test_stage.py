"""Stages built from a plan, run one after another in one process, equal the unsplit model exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_merak.partition import plan_model
from lightning_merak.pipeline.stage import build_stage
from tests.helpers.pipeline_models import build_hf


def _inputs(name: str, batch: int = 4, seq: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    if name in ("vit", "resnet"):
        size = 16 if name == "vit" else 32
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g),
                "labels": torch.randint(0, 3, (batch,), generator=g)}
    ids = torch.randint(0, 128, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": torch.randint(0, 2, (batch,), generator=g) if name == "bert" else ids}


def _run_chain(model: nn.Module, plan, kwargs: dict, checkpointed: int = 0):
    """Stage 0 -> ... -> S-1 forward, then backward S-1 -> 0, as the pipeline would (fresh leaves between)."""
    stages = []
    for s in range(len(plan.stages)):
        replica = copy.deepcopy(model)
        stage = build_stage(replica, plan, s)
        if checkpointed:
            stage.checkpoint_units(checkpointed)
        stages.append((replica, stage))
    received, inputs, outputs = (), [], []
    for s, (_, stage) in enumerate(stages):
        received = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in received)
        out = stage(*received, model_args=(), model_kwargs=kwargs)
        inputs.append(received)
        outputs.append(out)
        received = out if s < len(stages) - 1 else ()
    loss = outputs[-1].loss
    loss.backward()
    for s in range(len(stages) - 2, -1, -1):
        torch.autograd.backward(outputs[s], tuple(t.grad for t in inputs[s + 1]))
    return loss, [replica for replica, _ in stages]


@pytest.mark.parametrize("num_stages", [2, 4])
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "vit", "resnet", "bart"])
def test_stages_equal_unsplit_model(name, num_stages):
    torch.manual_seed(0)
    model = build_hf(name)
    kwargs = _inputs(name)
    plan = plan_model(model, ((), kwargs), num_stages)
    ref_loss = model(**kwargs).loss
    ref_loss.backward()
    reference = dict(model.named_parameters(remove_duplicate=False))
    loss, replicas = _run_chain(model, plan, kwargs)
    assert torch.equal(loss, ref_loss)
    grads = {}
    for replica in replicas:
        for key, p in replica.named_parameters(remove_duplicate=False):
            if p.grad is not None:  # a weight shared by two stages gets a part of its gradient on each
                grads[key] = grads[key] + p.grad if key in grads and grads[key] is not p.grad else p.grad
    for key, p in reference.items():
        if p.grad is not None:  # (Bart's `shared` embedding is unused when its embeddings are untied)
            torch.testing.assert_close(grads[key], p.grad, atol=1e-6, rtol=0, msg=key)
    keys = [set(r.state_dict()) for r in replicas]
    assert set().union(*keys) == set(model.state_dict())
    if name != "bart":  # Bart ties its encoder and decoder embeddings to one shared weight
        assert sum(map(len, keys)) == len(model.state_dict())


def test_variable_sequence_length_and_recompute():
    torch.manual_seed(0)
    model = build_hf("gpt2")
    plan = plan_model(model, ((), _inputs("gpt2", seq=8)), 2)
    for seq in (5, 11):
        kwargs = _inputs("gpt2", seq=seq)
        ref = copy.deepcopy(model)
        ref_loss = ref(**kwargs).loss
        ref_loss.backward()
        for checkpointed in (0, 2):
            loss, replicas = _run_chain(model, plan, kwargs, checkpointed)
            assert torch.equal(loss, ref_loss)
            for replica in replicas:
                for key, p in replica.named_parameters():
                    torch.testing.assert_close(p.grad, dict(ref.named_parameters())[key].grad, atol=1e-6, rtol=0)


def test_other_stages_hold_no_parameters():
    model = build_hf("llama")
    plan = plan_model(model, ((), _inputs("llama")), 2)
    owned = {n for n, _ in model.named_parameters()}
    stage = build_stage(copy.deepcopy(model), plan, 1)
    names = {n for n, _ in stage.module.named_parameters()}
    assert names and names < owned and all(n.startswith(("model.layers.", "model.norm", "lm_head")) for n in names)
    # a stripped block still answers attribute reads, from meta tensors that take no memory
    assert stage.module.model.embed_tokens.weight.device.type == "meta"
