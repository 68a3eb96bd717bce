"""Tensors that cross a cut without being a later block's argument: carried stage to stage and delivered where the
one-process forward made them.

- A tensor the module *returns* but no later block reads (a hidden state in the output): without it the last
  stage would return the stub's zeros.
- Values *collected across layers* by a forward hook and read at the end (transformers' router logits for the
  MoE auxiliary loss, hidden states with ``output_hidden_states``): the parent's code reads them after the last
  layer, which used to forbid every cut after the first block.

Stages run in one process, chained by hand (each stage's outputs are the next one's received tensors; backward
in reverse order), against the unpartitioned model with the same weights.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_merak.partition import plan_model
from lightning_merak.pipeline.stage import build_stage


def run_pipelined(model: nn.Module, plan, kwargs: dict, loss_of) -> tuple[object, dict[str, torch.Tensor]]:
    """Every stage of ``plan`` on its own copy of ``model``, forward then backward: (last output, gradients)."""
    stages = [build_stage(copy.deepcopy(model), plan, i) for i in range(len(plan.stages))]
    received: tuple = ()
    inputs, outputs = [], []
    for stage in stages:
        leaves = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in received)
        inputs.append(leaves)
        outputs.append(stage(*leaves, model_args=(), model_kwargs=kwargs))
        received = outputs[-1]
    loss_of(outputs[-1]).backward()
    for i in reversed(range(len(stages) - 1)):
        pairs = [(o, x.grad) for o, x in zip(outputs[i], inputs[i + 1], strict=True) if x.grad is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    grads = {name: p.grad for stage in stages for name, p in stage.module.named_parameters() if p.grad is not None}
    return outputs[-1], grads


def assert_same_grads(got: dict[str, torch.Tensor], model: nn.Module, tol: float = 1e-6) -> None:
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], atol=tol, rtol=0, msg=name)


class ReturnsEarlyHidden(nn.Module):
    """Returns its first block's output too, which no later block reads (``mid``)."""

    def __init__(self, blocks: int = 6) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(blocks))

    def forward(self, x):
        h = mid = self.blocks[0](x)
        for block in self.blocks[1:]:
            h = torch.tanh(block(h))
        return {"out": h, "mid": mid}


@pytest.mark.parametrize("cuts", [["blocks.3"], ["blocks.2", "blocks.4"]])
def test_returned_tensor_no_later_block_reads_reaches_the_last_stage(cuts):
    torch.manual_seed(0)
    model, x = ReturnsEarlyHidden(), torch.randn(3, 8)
    plan = plan_model(model, ((x,), {}), len(cuts) + 1, partition=cuts)
    assert all(len(s.sends) == 2 for s in plan.stages[:-1]), plan.table()   # the hidden state and `mid`
    reference = copy.deepcopy(model)
    want = reference(x)
    (want["out"].sum() + 3 * want["mid"].sum()).backward()
    got, grads = run_pipelined(model, plan, {"x": x}, lambda out: out["out"].sum() + 3 * out["mid"].sum())
    torch.testing.assert_close(got["mid"], want["mid"], atol=0, rtol=0)
    torch.testing.assert_close(got["out"], want["out"], atol=0, rtol=0)
    assert_same_grads(grads, reference)


class ReturnsParentMade(ReturnsEarlyHidden):
    def forward(self, x):
        h = self.blocks[0](x)
        mid = 2 * h   # made by the parent's own code: no block call hands it over
        for block in self.blocks[1:]:
            h = torch.tanh(block(h))
        return h, mid


def test_returned_tensor_the_parent_made_forbids_the_cut():
    from lightning_merak.partition import PartitionError

    with pytest.raises(PartitionError, match=r"cannot start a stage at 'blocks.3': tensor of shape \(3, 8\) made "
                                             r"from `blocks.0`'s output by the parent's own code is returned by the "
                                             r"module \(output leaf 1\)"):
        plan_model(ReturnsParentMade(), (torch.randn(3, 8),), 2, partition=["blocks.3"])


def test_hidden_states_output_reaches_the_last_stage():
    """Llama with ``output_hidden_states=True``: transformers records each layer's output by a hook; the early
    layers' ones are read by no later layer but returned."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                               num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=32))
    ids = torch.randint(0, 64, (2, 8))
    batch = {"input_ids": ids, "labels": ids, "output_hidden_states": True}
    plan = plan_model(model, ((), batch), 2)
    reference = copy.deepcopy(model)
    want = reference(**batch)
    want.loss.backward()
    got, grads = run_pipelined(model, plan, batch, lambda out: out.loss)
    assert len(got.hidden_states) == len(want.hidden_states) == 5
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=0)
    assert_same_grads(grads, reference)


def _mixtral(router_logits: bool, layers: int = 4):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                              output_router_logits=router_logits, router_aux_loss_coef=0.02, max_position_embeddings=32)
    ids = torch.randint(0, 64, (2, 8))
    return tf.MixtralForCausalLM(config), {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("num_stages", [2, 3])
def test_router_logits_are_carried_to_the_aux_loss(num_stages):
    """Mixtral's router logits, collected from every layer by a hook on its router and read by the auxiliary
    load-balancing loss after the last layer: each stage sends on the ones it received plus its own, the last
    stage's stubs hand them to the same hook, and the loss (aux loss included) equals one process."""
    model, batch = _mixtral(router_logits=True, layers=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        plan = plan_model(model, ((), batch), num_stages)
    # the same cuts as without the aux loss: the router logits no longer forbid any
    assert plan.cuts == plan_model(_mixtral(router_logits=False, layers=6)[0], ((), batch), num_stages).cuts
    assert plan.balance <= (1.15 if num_stages == 2 else 1.2), plan.table()
    carried = [[b for b in s.boundary if b.via.startswith("hooked output")] for s in plan.stages[:-1]]
    layers_before = [sum(u.startswith("model.layers.") for st in plan.stages[:i + 1] for u in st.units)
                     for i in range(num_stages - 1)]
    assert [len(c) for c in carried] == layers_before, plan.table()   # one router-logit tensor per layer so far
    assert carried[0][0].via == "hooked output of `model.layers.0.mlp.gate`" and carried[0][0].consumers == []
    reference = copy.deepcopy(model)
    want = reference(**batch)
    want.loss.backward()
    got, grads = run_pipelined(model, plan, batch, lambda out: out.loss)
    assert want.aux_loss.item() > 0
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=0)
    assert_same_grads(grads, reference)
