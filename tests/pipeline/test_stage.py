"""Stages built from a plan, run one after another in one process, equal the unsplit model exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_merak.partition import plan_model
from lightning_merak.pipeline.stage import build_stage, build_stages
from lightning_merak.rng import MicrobatchRNG
from tests.helpers.pipeline_models import build_hf


def _inputs(name: str, batch: int = 4, seq: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    if name in ("vit", "resnet"):
        size = 16 if name == "vit" else 32
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g),
                "labels": torch.randint(0, 3, (batch,), generator=g)}
    ids = torch.randint(0, 128, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": torch.randint(0, 2, (batch,), generator=g) if name == "bert" else ids}


def _run_chain(model: nn.Module, plan, kwargs: dict, checkpointed: int = 0, micro: int | None = None,
               placement: list[list[int]] | None = None):
    """Stage 0 -> ... -> S-1 forward, then backward S-1 -> 0, as the pipeline would (fresh leaves between).
    ``micro``: run each stage on micro-batch ``micro``'s RNG streams, as ``MerakStrategy(rng="microbatch")``.
    ``placement``: the stages each replica (rank) holds; default one each."""
    stages = [None] * len(plan.stages)
    for local in placement or [[s] for s in range(len(plan.stages))]:
        replica = copy.deepcopy(model)
        rng = MicrobatchRNG(replica, seed=7, device=torch.device("cpu")) if micro is not None else None
        for s, stage in zip(local, build_stages(replica, plan, local), strict=True):
            if checkpointed:
                stage.checkpoint_units(checkpointed)
            stages[s] = (replica, stage, rng)
    received, inputs, outputs = (), [], []
    for s, (_, stage, rng) in enumerate(stages):
        received = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in received)
        if rng is not None:
            torch.manual_seed(100 + s)  # each rank's generator is its own: the streams must not depend on it
            rng.start(0, micro, 4)
        out = stage(*received, model_args=(), model_kwargs=kwargs)
        inputs.append(received)
        outputs.append(out)
        received = out if s < len(stages) - 1 else ()
    loss = outputs[-1].loss
    loss.backward()
    for s in range(len(stages) - 2, -1, -1):
        torch.autograd.backward(outputs[s], tuple(t.grad for t in inputs[s + 1]))
    return loss, list({id(replica): replica for replica, _, _ in stages}.values())


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


@pytest.mark.parametrize("placement", [[[0, 2], [1, 3]], [[0, 3], [1, 2]]], ids=["interleaved", "v"])
@pytest.mark.parametrize("name", ["gpt2_tied", "llama"])
def test_two_stages_per_rank_equal_unsplit_model(name, placement):
    """Interleaved and V placements: two stages built on one pruned module (each runs its own blocks, the other
    local stage's are stubs while it runs); with recompute too. A weight tied across the two stages of one rank
    stays one parameter there."""
    torch.manual_seed(0)
    model = build_hf(name)
    kwargs = _inputs("gpt2" if name == "gpt2_tied" else name)
    plan = plan_model(model, ((), kwargs), 4)
    ref_loss = model(**kwargs).loss
    ref_loss.backward()
    reference = dict(model.named_parameters())
    for checkpointed in (0, 1):
        loss, replicas = _run_chain(model, plan, kwargs, checkpointed, placement=placement)
        assert torch.equal(loss, ref_loss)
        grads: dict[str, torch.Tensor] = {}
        for replica in replicas:
            # a weight tied across ranks (wte / lm_head): each rank's copy gets a part, summed as the engine does
            seen: set[int] = set()
            for key, p in replica.named_parameters(remove_duplicate=False):
                key = "transformer.wte.weight" if key == "lm_head.weight" and name == "gpt2_tied" else key
                if id(p) not in seen:
                    seen.add(id(p))
                    grads[key] = grads[key] + p.grad if key in grads else p.grad
        for key, p in reference.items():
            torch.testing.assert_close(grads[key], p.grad, atol=1e-6, rtol=0, msg=key)
        assert len(replicas) == 2 and set().union(*(r.state_dict() for r in replicas)) == set(model.state_dict())


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


def _grads(modules: list[nn.Module]) -> dict[str, torch.Tensor]:
    return {k: p.grad for m in modules for k, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("name", "num_stages"), [("gpt2", 2), ("gpt2", 4), ("llama", 4)])
def test_microbatch_rng_streams_make_dropout_layout_invariant(name, num_stages):
    """Dropout on: with micro-batch RNG streams, stages on separately seeded ranks (their other blocks zero
    stubs), with or without recomputation, draw exactly the masks of the unsplit model in one process."""
    torch.manual_seed(0)
    model = build_hf(name, dropout=0.3)
    kwargs = _inputs(name)
    plan = plan_model(model, ((), kwargs), num_stages)
    reference = copy.deepcopy(model)
    rng = MicrobatchRNG(reference, seed=7, device=torch.device("cpu"))
    rng.start(0, 1, 4)
    ref_loss = reference(**kwargs).loss
    ref_loss.backward()
    for checkpointed in (0, 1):
        loss, replicas = _run_chain(model, plan, kwargs, checkpointed, micro=1)
        assert torch.equal(loss, ref_loss)
        grads = _grads(replicas)
        for key, grad in _grads([reference]).items():
            assert torch.equal(grads[key], grad), key
    other, _ = _run_chain(model, plan, kwargs, micro=2)  # another micro-batch draws other masks
    plain = copy.deepcopy(model)(**kwargs).loss           # and dropout really is on
    eval_loss = copy.deepcopy(model).eval()(**kwargs).loss
    assert len({float(v.detach()) for v in (ref_loss, other, plain, eval_loss)}) == 4


def test_microbatch_rng_streams_hooks_removed():
    model = build_hf("gpt2", dropout=0.3)
    rng = MicrobatchRNG(model, seed=7, device=torch.device("cpu"))
    torch.manual_seed(3)
    model.transformer.drop(torch.ones(8))
    assert torch.initial_seed() != 3  # reseeded around the call
    rng.remove()
    torch.manual_seed(3)
    model.transformer.drop(torch.ones(8))
    assert torch.initial_seed() == 3


def test_microbatch_rng_streams_survive_delta_recompute():
    """DELTA replays a released block from the RNG state at the block's start (after its entry reseed): the
    streams give the same masks, so a recomputing plan stays bitwise equal to the unmanaged run."""
    from lightning_merak.memory import DeltaScheduler

    torch.manual_seed(0)
    model = build_hf("gpt2", dropout=0.3)
    kwargs = _inputs("gpt2")

    def grads_of_steps(module: nn.Module, delta=None) -> list[dict]:
        rng = MicrobatchRNG(module, seed=7, device=torch.device("cpu"))
        out = []
        for step in range(2):  # DELTA profiles step 0, plans (recompute: slow swaps) for step 1
            module.zero_grad(set_to_none=True)
            rng.start(step)
            if delta is None:
                module(**kwargs).loss.backward()
            else:
                with delta.forward():
                    loss = module(**kwargs).loss
                loss.backward()
                delta.end_step()
            out.append({k: p.grad.clone() for k, p in module.named_parameters()})
        return out

    reference = grads_of_steps(copy.deepcopy(model))
    managed = copy.deepcopy(model)
    params = sum(p.numel() * p.element_size() for p in managed.parameters())
    delta = DeltaScheduler(managed, memory_budget=2 * params + 200_000, profile_steps=1, swap_bandwidth=1e3)
    got = grads_of_steps(managed, delta)
    assert next(iter(delta.plans.values())).recompute
    for ref_step, got_step in zip(reference, got, strict=True):
        for key, grad in ref_step.items():
            assert torch.equal(got_step[key], grad), key
    delta.close()
