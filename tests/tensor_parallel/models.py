"""Tiny models (random weights, dropout off) shared by the tensor-parallel tests and benchmark."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64
BATCH, SEQ = 4, 8


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0))


def vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                               num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                               num_labels=3, hidden_dropout_prob=0.0,
                                               attention_probs_dropout_prob=0.0))


def demo() -> nn.Module:
    from lightning.pytorch.demos.transformer import Transformer

    return Transformer(vocab_size=VOCAB, ninp=32, nhead=4, nhid=64, nlayers=1, dropout=0.0)


MODELS = {"gpt2": gpt2, "llama": llama, "bert": bert, "vit": vit, "demo": demo}


def batch(name: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g),
                "labels": torch.randint(0, 3, (BATCH,), generator=g)}
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    if name == "demo":
        return {"inputs": ids, "target": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)}
    return {"input_ids": ids, "labels": ids}


def logits_and_loss(name: str, model: nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "demo":
        logp = model(inputs["inputs"], inputs["target"])
        return logp, F.nll_loss(logp.reshape(-1, VOCAB), inputs["target"].reshape(-1))
    out = model(**inputs)
    return out.logits, out.loss


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]()
