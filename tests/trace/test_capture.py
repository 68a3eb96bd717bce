"""The proxy graph: units, per-call records, FLOPs and taint from one meta-device run."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

from lightning_merak.trace import CaptureError, capture, find_units, meta_twin


def _gpt2(layers: int = 8) -> nn.Module:
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=128, n_positions=32))


def test_gpt2_units_are_embeddings_blocks_head():
    """Blocks stay whole unless one holds more than half a stage's parameters (then it is expanded)."""
    units = find_units(_gpt2(), num_stages=2)
    assert units == ["transformer.wte", "transformer.wpe", "transformer.drop",
                     *[f"transformer.h.{i}" for i in range(8)], "transformer.ln_f", "lm_head"]


def test_meta_twin_copies_no_weights():
    model = _gpt2()
    twin = meta_twin(model)
    assert all(p.device.type == "meta" for p in twin.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())
    # tied weights stay tied in the twin
    assert twin.lm_head.weight is twin.transformer.wte.weight


def test_calls_flops_and_taint():
    model = _gpt2()
    units = find_units(model, 2)
    ids = torch.zeros(2, 8, dtype=torch.long)
    cap = capture(model, (), {"input_ids": ids}, units)
    assert [units[c.unit] for c in cap.calls] == units  # each unit called once, in forward order
    block = units.index("transformer.h.0")
    out = cap.calls[cap.first_call[block]].output
    hidden = out[0] if isinstance(out, tuple) else out
    assert hidden.device.type == "meta" and tuple(hidden.shape) == (2, 8, 32)
    # a GPT-2 block: 2*b*s*(qkv 3h^2 + proj h^2 + mlp 8h^2) + attention 2*2*b*s^2*h
    expected = 2 * 2 * 8 * 12 * 32 * 32 + 2 * 2 * 2 * 8 * 8 * 32
    assert cap.unit_flops[block] == expected
    # the block's argument depends on wte and wpe (taint) and is read as an argument of h.0
    arg = next(t for t in cap.calls[cap.first_call[block]].args if isinstance(t, torch.Tensor))
    info = next(v for v in cap.tensors.values() if v["shape"] == tuple(arg.shape) and v["reads"]
                and v["reads"][0][1] == ("call", cap.first_call[block], 0))
    assert info["taint"] == {units.index("transformer.wte"), units.index("transformer.wpe")}


def test_rotary_tables_and_mask_are_untainted():
    model = tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=8, hidden_size=32, intermediate_size=64,
                                               num_attention_heads=2, num_key_value_heads=2, vocab_size=128))
    units = find_units(model, 2)
    cap = capture(model, (), {"input_ids": torch.zeros(1, 8, dtype=torch.long)}, units)
    layer = cap.calls[cap.first_call[units.index("model.layers.1")]]
    tensors = [t for t in layer.args if isinstance(t, torch.Tensor)]
    assert len(tensors) >= 3  # hidden states, cos, sin (and a mask or position ids)
    tainted = [info for info in cap.tensors.values()
               if any(r[1][:2] == ("call", layer.index) for r in info["reads"])]
    assert [tuple(i["shape"]) for i in tainted] == [(1, 8, 32)]  # only the hidden states carry taint


class Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(x).reshape(3, 5))


def test_failure_names_the_innermost_module():
    with pytest.raises(CaptureError, match=r"`<root> \(Broken\)` raised .*size 8"):
        capture(Broken(), (torch.randn(2, 4),), {}, ["a", "b"])
    with pytest.raises(CaptureError, match=r"`0.a \(Linear\)` raised"):  # the inner Linear gets 5 features
        capture(nn.Sequential(Broken(), nn.Linear(4, 4)), (torch.randn(3, 5),), {})


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.probe = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, h):
        h = self.linear(h)
        self.probe(h)  # returned to no one: a forward hook collects it
        return h


class Collects(nn.Module):
    """Each block's inner ``probe`` returns a value a forward hook collects (as transformers' output recorders do);
    the parent reads the collected values after the last block and returns the first block's output too."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))

    def forward(self, x):
        self.collected: list[torch.Tensor] = []
        if not getattr(self, "_output_capturing_hooks_installed", False):  # lazily, under transformers' flag name
            self._output_capturing_hooks_installed = True
            for block in self.blocks:
                block.probe.register_forward_hook(lambda mod, args, out: self.collected.append(out))
        first = h = self.blocks[0](x)
        for block in self.blocks[1:]:
            h = block(h)
        return h, first, torch.stack(self.collected).sum()


def test_where_tensors_are_made_and_the_output_as_a_last_read():
    """``made``: a leaf of a unit call's output; ``side``: a leaf of a hooked module's output inside a unit (the
    innermost hooked one); what the module returns is read at the end, as ``("output", leaf)``."""
    model = Collects()
    cap = capture(model, (torch.randn(3, 4),), {}, ["blocks.0", "blocks.1", "blocks.2"])
    first = next(v for v in cap.tensors.values() if v["made"] == ("out", 0, 0))
    assert [r[1] for r in first["reads"]] == [("call", 1, 0), ("output", 1)]   # blocks.1's argument, returned
    assert first["side"] is None
    sides = sorted(v["side"] for v in cap.tensors.values() if v["side"])
    assert sides == [("side", c, f"blocks.{c}.probe", 0, 0) for c in range(3)]
    collected = [v for v in cap.tensors.values() if v["side"]]
    assert all(v["made"] is None and v["reads"][0][1][0] == "op" for v in collected)   # read by the stack
    assert tuple(cap.site_meta(sides[0]).shape) == (3, 2)
    # with the probes as units of their own, their outputs are made by unit calls instead
    fine = capture(model, (torch.randn(3, 4),), {}, [f"blocks.{b}.{m}" for b in range(3) for m in ("linear", "probe")])
    probes = [v for v in fine.tensors.values() if v["made"] and fine.units[fine.calls[v["made"][1]].unit].endswith("probe")]
    assert len(probes) == 3 and not any(v["side"] for v in fine.tensors.values())
