"""Partition quality: when legal cuts force a poor balance, the plan says which tensor forbids the better cuts."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_merak.partition import plan_model


def _mixtral(router_logits: bool):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                              output_router_logits=router_logits, router_aux_loss_coef=0.02, max_position_embeddings=32)
    ids = torch.randint(0, 64, (2, 8))
    return tf.MixtralForCausalLM(config), {"input_ids": ids, "labels": ids}


class KeepsAnEarlyValue(nn.Module):
    """The parent's own code makes ``early`` from the first layer's output and reads it after the last layer: only
    the cut before that layer is legal."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        h = self.layers[0](self.embed(x))
        early = 2 * h
        for layer in self.layers[1:]:
            h = torch.tanh(layer(h))
        return h + early


def test_forced_imbalance_is_explained():
    """The warning names the tensor, its maker and reader, and what the user can do."""
    with pytest.warns(UserWarning) as caught:
        plan = plan_model(KeepsAnEarlyValue(), (torch.randn(3, 4),), 2)
    assert plan.units[plan.cuts[0]] == "layers.0" and plan.balance > 1.25
    message = next(str(w.message) for w in caught if "stage balance" in str(w.message))
    assert f"stage balance of {plan.balance:.2f}" in message
    assert "starting a stage at `layers.2` is illegal" in message
    assert "made by `layers.0` is read after the cut by the parent's own code (`add`)" in message
    assert "KeepsAnEarlyValue.forward" in message and "return it from a block" in message


@pytest.mark.parametrize("router_logits", [True, False])
def test_mixtral_cut_is_balanced_and_silent_with_and_without_router_logits(router_logits):
    """The router logits transformers collects from every layer for the aux loss are carried to the last stage
    (tests/partition/test_carried.py), so they no longer forbid cuts between layers."""
    model, batch = _mixtral(router_logits)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        plan = plan_model(model, ((), batch), 2)
    assert plan.balance <= 1.15 and plan.units[plan.cuts[0]] == "model.layers.2", plan.table()
    hooked = [b for b in plan.stages[0].boundary if b.via.startswith("hooked output")]
    assert len(hooked) == (2 if router_logits else 0)


def test_a_model_that_has_run_still_plans():
    """transformers installs its router-logit recorders at the first forward; the planner's hook-free copy of
    the model must install its own (else the aux loss finds no logits, and none would be carried)."""
    model, batch = _mixtral(router_logits=False)
    model.config.output_router_logits = True
    model(**batch)
    plan = plan_model(model, ((), batch), 2)
    assert [b.via for b in plan.stages[0].boundary if b.via != "argument"] == [
        "hooked output of `model.layers.0.mlp.gate`", "hooked output of `model.layers.1.mlp.gate`"]
