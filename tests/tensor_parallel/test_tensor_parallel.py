"""Tensor parallelism at module level: plans, tp = 2 numerics against one process, sub-tensor overlap, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_merak.tensor_parallel import TPPlan, tp_plan_for
from tests.helpers.launch import spawn
from tests.tensor_parallel import workers
from tests.tensor_parallel.models import build

TOL = 1e-5


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """One 2-process launch runs every tp = 2 check (``workers.all_checks``); each test asserts its own."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path_factory.mktemp("tp2")
    dcp.save(build("demo", seed=3).state_dict(), checkpoint_id=str(folder / "one"), no_dist=True)
    return [{"folder": folder, **r} for r in spawn(workers.all_checks, 2, str(folder), timeout=240)]


def _check(results: dict) -> None:
    for (name, k), d in results.items():
        for key in ("logits", "loss", "grads", "params", "vs_first_chunking"):
            assert d[key] < TOL, f"{name} subtensor_chunks={k}: {key} differs by {d[key]:.2e}"
        assert d["moved"] > 1e-3, f"{name}: the optimizer steps did not change the parameters"
        assert d["dtensors"] >= 10, f"{name}: only {d['dtensors']} DTensor parameters"


@pytest.mark.multiprocess
@pytest.mark.parametrize("names", [["gpt2", "llama"], ["bert", "vit"]], ids=["gpt2+llama", "bert+vit"])
def test_transformers_models_tp2_equal_one_process(ranks, names):
    """GPT-2 (Conv1D, fused q|k|v), Llama (its own plan, GQA), BERT, ViT: plain TP and k = 2, 4, 3 SGD steps."""
    results = [r["+".join(names)] for r in ranks]
    assert results[0] == results[1]
    _check(results[0])


@pytest.mark.multiprocess
def test_lightning_demo_transformer_and_adamw_tp2_equal_one_process(ranks):
    """Lightning's demo ``Transformer`` (nn.MultiheadAttention + nn.Linear FFN); Llama with 3 AdamW steps.

    (AdamW on the demo would compare noise: MHA's key bias has a mathematically zero gradient, ~1e-9 in
    float32, which Adam normalises to ±lr.)
    """
    _check(ranks[0]["demo+llama:adamw"])


@pytest.mark.multiprocess
def test_clip_grad_norm_counts_shards_and_replicas_once(ranks):
    r = ranks[0]["clip_norms"]
    assert r["norm"] == pytest.approx(r["ref_norm"], rel=1e-5)
    assert r["ref_norm"] > 0.5  # clipping really happened
    assert r["clipped_grads"] < TOL
    assert r["pp_norm"] == pytest.approx((3 * 1 + 3 * 4) ** 0.5, rel=1e-6)


@pytest.mark.multiprocess
def test_stubbed_stage_and_cross_node_warning(ranks):
    r = ranks[0]["stubs_and_warning"]
    assert r["hidden"] < TOL
    assert not any(".layers.1." in n or n.startswith("lm_head") for n in r["sharded"])
    assert any("model.layers.0.self_attn.q_proj" in n for n in r["sharded"])
    assert any("larger than the 1 devices of one node" in w for w in r["warnings"])


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["demo"])
def test_dcp_checkpoint_tp2_to_one_process_and_back(ranks, name):
    """Fused q|k|v (nn.MultiheadAttention here, GPT-2 below): strided shards save as the original tensors.
    The launch saved the tp model (seed 1) to ``tp2`` and loaded the one-process ``one`` (seed 3) back."""
    import torch.distributed.checkpoint as dcp

    tp2 = ranks[0]["folder"] / "tp2"
    assert [r["checkpoint_round_trip"] for r in ranks] == [0.0, 0.0]
    expected, model = build(name, seed=1), build(name, seed=2)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(tp2), no_dist=True)
    model.load_state_dict(state)
    for (n, a), b in zip(model.state_dict().items(), expected.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


# ---- plans (one process) ---------------------------------------------------------------------------------

def test_gpt2_plan_shards_fused_qkv_per_head_and_sets_local_heads():
    plan = tp_plan_for(build("gpt2"), 2)
    assert plan.source == "auto"
    assert plan.styles["transformer.h.0.attn.c_attn"] == "colwise_fused"
    assert plan.fused["transformer.h.0.attn.c_attn"] == 3
    assert plan.styles["transformer.h.0.attn.c_proj"] == "rowwise"
    assert plan.styles["transformer.h.1.mlp.c_fc"] == "colwise"
    assert plan.styles["transformer.wte"] == "embedding_vocab"
    assert plan.styles["lm_head"] == "head_vocab_gather"
    assert "transformer.wpe" not in plan.styles  # positions stay replicated
    assert plan.attributes["transformer.h.0.attn"] == {"num_heads": 2, "split_size": 16}
    table = plan.table()
    assert "transformer.h.0.attn.c_attn  colwise_fused ×3" in table and "set num_heads=2, split_size=16" in table


def test_llama_uses_transformers_plan():
    plan = tp_plan_for(build("llama"), 2)
    assert plan.source == "hf"
    assert plan.styles["model.layers.1.self_attn.k_proj"] == "colwise"
    assert plan.styles["model.layers.1.mlp.down_proj"] == "rowwise"
    assert plan.styles["model.embed_tokens"] == "embedding_vocab"
    assert plan.styles["lm_head"] == "head_vocab_gather"
    assert len(plan.styles) == 2 * 7 + 2


def test_demo_plan_detects_multihead_attention_and_ffn():
    plan = tp_plan_for(build("demo"), 2)
    assert plan.styles["transformer.encoder.layers.0.self_attn"] == "mha_heads"
    assert plan.styles["transformer.decoder.layers.0.multihead_attn"] == "mha_heads"
    assert plan.styles["transformer.encoder.layers.0.linear1"] == "colwise"
    assert plan.styles["transformer.encoder.layers.0.linear2"] == "rowwise"
    assert plan.styles["embedding"] == "embedding_vocab" and plan.styles["decoder"] == "head_vocab_gather"
    assert not any("out_proj" in k for k in plan.styles)


def test_vit_and_bert_plans():
    vit = tp_plan_for(build("vit"), 2)
    assert [vit.styles[f"vit.layers.0.{m}"] for m in ("attention.q_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")] \
        == ["colwise", "rowwise", "colwise", "rowwise"]
    assert "classifier" not in vit.styles
    bert = tp_plan_for(build("bert"), 2)
    assert bert.styles["bert.encoder.layer.0.attention.self.value"] == "colwise"
    assert bert.styles["bert.encoder.layer.0.attention.output.dense"] == "rowwise"
    assert bert.styles["bert.encoder.layer.0.intermediate.dense"] == "colwise"
    assert bert.styles["bert.encoder.layer.0.output.dense"] == "rowwise"
    assert "cls.predictions.transform.dense" not in bert.styles  # its output goes through a LayerNorm
    assert bert.attributes["bert.encoder.layer.0.attention.self"] == {"num_attention_heads": 2, "all_head_size": 16}


def test_residual_stops_a_pair():
    """A linear whose output is added to the residual stream before the next linear is not a column layer."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.c(torch.relu(self.b(x + self.a(x))))

    plan = tp_plan_for(Block(), 2, example_inputs=(torch.randn(2, 8),))
    assert plan.styles == {"b": "colwise", "c": "rowwise"}


# ---- bad input --------------------------------------------------------------------------------------------

def test_heads_not_divisible():
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn: 4 attention heads .* tensor_parallel_size=3"):
        tp_plan_for(build("gpt2"), 3)


def test_key_value_heads_not_divisible():
    with pytest.raises(ValueError, match=r"k_proj: 2 attention key-value heads .* tensor_parallel_size=4"):
        tp_plan_for(build("llama"), 4)


def test_mha_heads_not_divisible():
    with pytest.raises(ValueError, match=r"self_attn: 4 attention heads are not divisible by tensor_parallel_size=3"):
        tp_plan_for(build("demo"), 3)


def test_vocabulary_not_divisible_explains_padding():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=66, n_positions=16, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match=r"vocabulary of 66 is not divisible by tensor_parallel_size=4.*"
                                         r"pad_to_multiple_of=4"):
        tp_plan_for(model, 4)


def test_nothing_to_shard():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match="Sequential has nothing to shard"):
        tp_plan_for(model, 2, example_inputs=(torch.randn(2, 8),))


def test_plan_for_other_tp_size_rejected_by_apply():
    from lightning_merak.tensor_parallel import apply_tensor_parallel

    class FakeMesh:
        ndim = 1

        def size(self):
            return 2

    with pytest.raises(ValueError, match="made for tensor_parallel_size=4"):
        apply_tensor_parallel(nn.Linear(2, 2), FakeMesh(), TPPlan(4, {}))


@pytest.mark.multiprocess
def test_gpt2_model_and_optimizer_state_checkpoint_tp2_to_one_process(ranks):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from tests.tensor_parallel.models import batch, logits_and_loss

    assert [r["optimizer_checkpoint"] for r in ranks] == [0.0, 0.0]
    path = ranks[0]["folder"] / "optimizer"
    ref = build("gpt2")
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for step in range(2):
        logits_and_loss("gpt2", ref, batch("gpt2", seed=step))[1].backward()
        opt.step()
        opt.zero_grad()
    state = {"optim": get_optimizer_state_dict(ref, opt), "model": build("gpt2", seed=5).state_dict()}
    want = {k: v["momentum_buffer"].clone() for k, v in state["optim"]["state"].items()}
    for v in state["optim"]["state"].values():
        v["momentum_buffer"].zero_()
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    assert "transformer.h.0.attn.c_attn.weight" in want
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(state["model"][k], v, atol=TOL, rtol=0, msg=k)
    for k, v in state["optim"]["state"].items():
        torch.testing.assert_close(v["momentum_buffer"], want[k], atol=TOL, rtol=0, msg=k)


def test_detection_has_no_side_effects_and_takes_args_kwargs_pair():
    model = build("demo").train()
    model.transformer.encoder.layers[0].dropout.p = 0.5
    ids = torch.randint(0, 64, (2, 8))
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    plan = tp_plan_for(model, 2, example_inputs=((ids,), {"target": ids}))
    assert torch.equal(torch.rand(3), before)  # the RNG stream is untouched
    assert model.training and model.transformer.encoder.layers[0].training
    assert plan.styles["transformer.encoder.layers.0.linear1"] == "colwise"


@pytest.mark.multiprocess
def test_micro_batch_of_one_splits_the_sequence(ranks):
    diffs = ranks[0]["batch_of_one"]
    assert max(diffs.values()) < TOL, diffs


def test_split_dimension_choice():
    from lightning_merak.tensor_parallel.styles import _split_dim

    assert _split_dim(torch.empty(4, 8, 2), 2) == 0
    assert _split_dim(torch.empty(1, 8, 2), 4) == 1
    assert _split_dim(torch.empty(1, 2, 2), 4) == 0  # too short to split: one chunk
