"""Partition plans on the meta-device proxy graph: balance, legality, errors, JSON/table, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers as tf
from torch import nn

from lightning_merak.partition import PartitionError, PartitionPlan, plan_model
from tests.helpers.launch import REPO


def _ids(batch: int = 2, seq: int = 16, vocab: int = 256) -> dict:
    ids = torch.randint(0, vocab, (batch, seq))
    return {"input_ids": ids, "labels": ids}


BALANCED = {
    "gpt2": lambda: (tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=16, n_embd=64, n_head=4, vocab_size=256,
                                                      n_positions=64)), _ids()),
    "llama": lambda: (tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=16, hidden_size=64, intermediate_size=128,
                                                         num_attention_heads=4, num_key_value_heads=2,
                                                         vocab_size=256)), _ids()),
    "bert": lambda: (tf.BertForSequenceClassification(tf.BertConfig(num_hidden_layers=16, hidden_size=64,
                                                                    num_attention_heads=4, intermediate_size=128,
                                                                    vocab_size=256)),
                     {"input_ids": torch.randint(0, 256, (2, 16)), "labels": torch.tensor([0, 1])}),
    "vit": lambda: (tf.ViTForImageClassification(tf.ViTConfig(num_hidden_layers=16, hidden_size=64, num_attention_heads=4,
                                                              intermediate_size=128, image_size=32, patch_size=4)),
                    {"pixel_values": torch.randn(2, 3, 32, 32)}),
    "resnet": lambda: (tf.ResNetForImageClassification(tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                                                                       depths=[4, 4, 4, 4], layer_type="basic")),
                       {"pixel_values": torch.randn(2, 3, 32, 32)}),
}


@pytest.mark.parametrize("name", sorted(BALANCED))
def test_balance_at_four_stages(name):
    model, kwargs = BALANCED[name]()
    plan = plan_model(model, ((), kwargs), 4)
    print(f"\n{name}\n{plan.table()}")
    assert len(plan.stages) == 4 and all(s.units for s in plan.stages)
    assert plan.balance <= 1.10, plan.table()
    # every parameter is owned by some stage
    owned = {id(p) for s in plan.stages for u in s.units for p in model.get_submodule(u).parameters()}
    assert owned == {id(p) for p in model.parameters()}


def test_plan_is_json_and_table():
    model, kwargs = BALANCED["gpt2"]()
    plan = plan_model(model, ((), kwargs), 2)
    data = json.loads(plan.to_json())
    assert data["num_stages"] == 2 and data["stages"][0]["sends"][0]["shape"] == [2, 16, 64]
    assert data["stages"][0]["sends"][0]["bytes"] == 2 * 16 * 64 * 4
    assert "balance" in plan.table() and isinstance(plan, PartitionPlan)
    send = data["stages"][0]["sends"][0]
    assert send["producer"] == plan.stages[0].units[-1] and send["consumers"] == [plan.stages[1].units[0]]
    assert data["stages"][0]["parameters"] == sum(p.numel() for u in plan.stages[0].units
                                                  for p in model.get_submodule(u).parameters())
    assert data["tied"] == [{"names": ["transformer.wte.weight", "lm_head.weight"], "stages": [0, 1]}]
    # read back: a description without the model, a usable (re-checked) plan with it
    described = PartitionPlan.from_json(plan.to_json())
    assert described.table() == plan.table() and described.to_dict() == data
    replanned = PartitionPlan.from_json(plan.to_json(), model, ((), kwargs))
    assert replanned.cuts == plan.cuts and replanned.capture is not None


def test_rotary_and_mask_are_recomputed_not_sent():
    """Llama's rotary cos/sin and causal mask depend on the batch only: each stage makes its own, so only the
    hidden states cross (the case torch's own tracer cannot split beyond 2 stages)."""
    model, kwargs = BALANCED["llama"]()
    plan = plan_model(model, ((), kwargs), 4)
    assert [len(s.sends) for s in plan.stages] == [1, 1, 1, 0]


def test_hand_written_partition_checked():
    model, kwargs = BALANCED["gpt2"]()
    plan = plan_model(model, ((), kwargs), 2, partition=["transformer.h.6"])
    assert plan.stages[1].units[0] == "transformer.h.6"
    with pytest.raises(PartitionError, match="not a block"):
        plan_model(model, ((), kwargs), 2, partition=["transformer.h.6.attn"])
    with pytest.raises(PartitionError, match="must list 2 block names"):
        plan_model(model, ((), kwargs), 3, partition=["transformer.h.6"])
    with pytest.raises(PartitionError, match="forward order"):
        plan_model(model, ((), kwargs), 3, partition=["transformer.h.6", "transformer.h.2"])


class Residual(nn.Module):
    """Blocks whose residual lives in the parent: cutting between ``attn`` and ``mlp`` of one layer is illegal,
    since the parent adds the layer input after the cut."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.mlp = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

    def forward(self, x):
        for attn, mlp in zip(self.attn, self.mlp, strict=True):
            h = attn(x)
            x = x + mlp(h)
        return x


def test_illegal_cut_names_tensor_and_modules():
    with pytest.raises(PartitionError, match=r"cannot start a stage at 'mlp.1': tensor of shape \(2, 8\) made by "
                                             r"`mlp.0` is read after the cut by the parent's own code \(`add`\)"):
        plan_model(Residual(), (torch.randn(2, 8),), 2, partition=["mlp.1"])


def test_too_few_cut_points():
    with pytest.raises(PartitionError, match="at most 2 pipeline stages"):
        plan_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), (torch.randn(2, 4),), 4)


def test_nested_sequential_units():
    block = lambda: nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 8)))  # noqa: E731
    model = nn.Sequential(nn.Linear(4, 8), *[block() for _ in range(4)], nn.Linear(8, 2))
    plan = plan_model(model, (torch.randn(3, 4),), 3)
    assert plan.units[0] == "0" and len(plan.stages) == 3
    assert sum(len(s.units) for s in plan.stages) == len(plan.units)


def test_encoder_output_carried_across_stages():
    model = tf.BartForConditionalGeneration(tf.BartConfig(encoder_layers=2, decoder_layers=4, d_model=32,
                                                          encoder_attention_heads=2, decoder_attention_heads=2,
                                                          encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128,
                                                          max_position_embeddings=32))
    plan = plan_model(model, ((), _ids(vocab=128)), 3)
    # the encoder output is needed by every decoder layer: every cut after the encoder carries it
    assert all(len(s.sends) == 2 for s in plan.stages[:-1]), plan.table()


def test_cli_plan_prints_table_and_json():
    cmd = [sys.executable, "-m", "lightning_merak.cli", "plan", "--hf-config", "gpt2", "--set", "n_layer=8",
           "n_embd=64", "n_head=4", "vocab_size=256", "--stages", "4", "--seq-len", "32"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "balance" in out.stdout and "transformer.h." in out.stdout
    data = json.loads(subprocess.run(cmd + ["--json"], capture_output=True, text=True, cwd=REPO, timeout=120).stdout)
    assert data["num_stages"] == 4
