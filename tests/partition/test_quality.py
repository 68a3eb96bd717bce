"""Partition quality: when legal cuts force a poor balance, the plan says which tensor forbids the better cuts."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_merak.partition import plan_model


def _mixtral(router_logits: bool):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                              output_router_logits=router_logits, router_aux_loss_coef=0.02, max_position_embeddings=32)
    ids = torch.randint(0, 64, (2, 8))
    return tf.MixtralForCausalLM(config), {"input_ids": ids, "labels": ids}


def test_router_aux_loss_forced_imbalance_is_explained():
    """Router logits collected across layers and read by the aux loss at the end make every cut between layers
    illegal: only the embedding can be stage 0 (balance 2.0). The warning names the tensor, its maker and reader,
    and the option that lifts it."""
    model, batch = _mixtral(router_logits=True)
    with pytest.warns(UserWarning) as caught:
        plan = plan_model(model, ((), batch), 2)
    assert plan.balance == pytest.approx(2.0)
    message = next(str(w.message) for w in caught if "stage balance" in str(w.message))
    assert "stage balance of 2.00" in message and "would give 1.14" in message
    assert "starting a stage at `model.layers.2` is illegal" in message
    assert "made by `model.layers.0`" in message and "MixtralForCausalLM.forward" in message
    assert "model.config.output_router_logits = False" in message


def test_without_router_logits_the_cut_is_balanced_and_silent():
    model, batch = _mixtral(router_logits=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        plan = plan_model(model, ((), batch), 2)
    assert plan.balance < 1.25 and plan.units[plan.cuts[0]] == "model.layers.2"


def test_a_model_that_has_run_still_plans():
    """transformers installs its router-logit recorders at the first forward; the planner's hook-free copy of
    the model must install its own (else the aux loss finds no logits)."""
    model, batch = _mixtral(router_logits=False)
    model.config.output_router_logits = True
    model(**batch)
    with pytest.warns(UserWarning, match="stage balance"):
        assert plan_model(model, ((), batch), 2).balance == pytest.approx(2.0)
