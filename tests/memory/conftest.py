"""Tiny models (random init, no downloads) and an unmanaged reference loop for the DELTA tests."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

logging.getLogger("transformers").setLevel(logging.ERROR)


def build(kind: str) -> torch.nn.Module:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        ResNetConfig,
        ResNetForImageClassification,
    )

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=256, n_positions=64, use_cache=False,
                         bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg).train()
    if kind == "bert":
        cfg = BertConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                         vocab_size=300, max_position_embeddings=64, num_labels=3)
        return BertForSequenceClassification(cfg).train()
    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[1, 2, 2, 1],
                       layer_type="bottleneck", num_labels=5)
    return ResNetForImageClassification(cfg).train()


def batch(kind: str, size: int = 4, seq: int = 32) -> dict:
    if kind == "gpt2":
        x = torch.randint(0, 256, (size, seq))
        return {"input_ids": x, "labels": x}
    if kind == "bert":
        x = torch.randint(0, 300, (size, seq))
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.randint(0, 3, (size,))}
    return {"pixel_values": torch.randn(size, 3, 64, 64), "labels": torch.randint(0, 5, (size,))}


def train(model: torch.nn.Module, kind: str, delta=None, steps: int = 4, seq: int = 32) -> list:
    """Run ``steps`` steps (seeded); return (loss, grads, buffers, ledger stats) per step."""
    torch.manual_seed(1)
    out = []
    for _ in range(steps):
        b = batch(kind, seq=seq)
        model.zero_grad(set_to_none=True)
        if delta is None:
            loss = model(**b).loss
        else:
            with delta.forward():
                loss = model(**b).loss
        loss.backward()
        stats = delta.end_step() if delta is not None else None
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        bufs = {n: t.clone() for n, t in model.named_buffers()}
        out.append((loss.detach().clone(), grads, bufs, stats))
    return out


def saved_bytes(model: torch.nn.Module, kind: str, seq: int = 32) -> int:
    """Independent measure: distinct storages autograd saves in one forward, parameters and buffers excluded."""
    params = {id(t.untyped_storage()) for t in list(model.parameters()) + list(model.buffers())}
    held: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if id(s) not in params:
            held[id(s)] = s  # held alive, so ids cannot be reused during the forward
        return t

    torch.manual_seed(1)
    with saved_tensors_hooks(pack, lambda t: t):
        model(**batch(kind, seq=seq))
    return sum(s.nbytes() for s in held.values())


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def assert_same(ref: list, got: list) -> None:
    assert len(ref) == len(got)
    for step, (a, b) in enumerate(zip(ref, got, strict=True)):
        assert torch.equal(a[0], b[0]), f"loss differs at step {step}: {a[0]} vs {b[0]}"
        assert a[1].keys() == b[1].keys()
        for name in a[1]:
            assert torch.equal(a[1][name], b[1][name]), f"grad of {name} differs at step {step}"
        for name in b[2]:
            assert torch.equal(a[2][name], b[2][name]), f"buffer {name} differs at step {step}"


@pytest.fixture
def zoo() -> SimpleNamespace:
    return SimpleNamespace(build=build, batch=batch, train=train, saved_bytes=saved_bytes,
                           param_bytes=param_bytes, assert_same=assert_same, copy=copy.deepcopy)
