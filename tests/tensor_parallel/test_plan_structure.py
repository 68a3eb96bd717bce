"""TP plans decided by structure, not by sizes: the output head, per-head position information, coverage."""

from __future__ import annotations

import pytest

from lightning_merak.tensor_parallel import tp_plan_for
from tests.breadth.families import build


def test_mamba_head_is_the_tied_lm_head_not_a_layer_of_vocabulary_width():
    """Mamba's dt_proj has as many outputs as the tiny vocabulary: it must not be taken for the head."""
    model, batch = build("mamba")
    assert model.backbone.layers[0].mixer.dt_proj.out_features == model.config.vocab_size
    with pytest.warns(UserWarning, match=r"no layer of the blocks `backbone.layers` is tensor-parallel.*"
                                         r"tensor_parallel_size=1"):
        plan = tp_plan_for(model, 2, example_inputs=((), batch))
    assert plan.styles == {"backbone.embeddings": "embedding_vocab", "lm_head": "head_vocab_gather"}
    assert plan.blocks_without_tp == "backbone.layers"
    assert "TP shards 11.4% of the parameters" in plan.table()


def test_gpt2_plan_reports_its_share_and_no_warning(recwarn):
    model, batch = build("gpt2")
    plan = tp_plan_for(model, 2, example_inputs=((), batch))
    assert plan.blocks_without_tp is None and plan.sharded_share > 0.9
    assert not [w for w in recwarn if "tensor-parallel" in str(w.message)]


def test_bloom_alibi_is_sliced_per_head():
    model, batch = build("bloom")
    plan = tp_plan_for(model, 2, example_inputs=((), batch))
    assert plan.head_inputs["transformer.h.0.self_attention"] == {"alibi": ("batch_heads", 4)}
    assert plan.attributes["transformer.h.0.self_attention"]["num_heads"] == 2
    assert "input alibi (batch × heads of 4) sliced to this rank's heads" in plan.table()


def test_t5_relative_position_bias_is_split_by_heads():
    model, batch = build("t5")
    plan = tp_plan_for(model, 2, example_inputs=((), batch))
    assert plan.styles["encoder.block.0.layer.0.SelfAttention.relative_attention_bias"] == "embedding_heads"
    assert plan.styles["encoder.block.1.layer.0.SelfAttention.q"] == "colwise"
    assert plan.attributes["encoder.block.1.layer.0.SelfAttention"] == {"n_heads": 2, "inner_dim": 16}


def test_mixtral_experts_take_transformers_moe_plan():
    model, batch = build("mixtral")
    plan = tp_plan_for(model, 2, example_inputs=((), batch))
    assert plan.source == "hf"
    assert plan.styles["model.layers.1.mlp.experts"] == "moe_experts"
    assert "model.layers.1.mlp.gate" not in plan.styles  # routing stays replicated
    import transformers as tf

    odd = tf.MixtralForCausalLM(tf.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=66,
                                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                                 num_local_experts=2, num_experts_per_tok=1))
    with pytest.raises(ValueError, match=r"experts' 66 intermediate features are not divisible by "
                                         r"tensor_parallel_size=4"):
        tp_plan_for(odd, 4, example_inputs=((), batch))
