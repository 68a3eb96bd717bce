"""Item 2: the ledger's bytes against hand-computed and independently measured saved bytes."""

from __future__ import annotations

import gc

import torch
from torch import nn

from lightning_merak.memory import DeltaScheduler

BATCH, WIDTH, HIDDEN = 64, 32, 128


class MLP(nn.Module):
    """blocks of Linear -> ReLU: each saves its input (Linear) and its output (ReLU)."""

    def __init__(self, blocks: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, WIDTH)) for _ in range(blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def step(model, delta, x):
    with delta.forward():
        loss = model(x).square().mean()
    loss.backward()
    return delta.end_step()


def test_hand_computed_bytes_keep_swap_and_resident():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(BATCH, WIDTH, requires_grad=True)
    # Per block: Linear1 saves the block input (B x W), ReLU its output (B x H), Linear2 that same output
    # (one storage); inputs of blocks 2 and 3 are block outputs; square() in the loss saves the last one.
    per_block = BATCH * WIDTH * 4 + BATCH * HIDDEN * 4
    expected = 3 * per_block + BATCH * WIDTH * 4
    huge = 10 * 2**30
    delta = DeltaScheduler(model, memory_budget=huge, profile_steps=1, min_swap_bytes=1)
    profile_stats = step(model, delta, x)
    assert profile_stats["delta/swapped_bytes"] == expected  # profiling swaps everything
    assert profile_stats["delta/kept_bytes"] == 0
    keep_stats = step(model, delta, x)  # the budget is huge: the plan keeps everything
    assert keep_stats["delta/kept_bytes"] == expected
    assert keep_stats["delta/peak_bytes"] == expected
    assert keep_stats["delta/swapped_bytes"] == keep_stats["delta/recomputed_bytes"] == 0
    assert delta.ledger.resident == 0  # everything freed after backward
    delta.close()


def test_swapped_storages_are_really_released():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(BATCH, WIDTH, requires_grad=True)
    delta = DeltaScheduler(model, memory_budget=10 * 2**30, profile_steps=5, min_swap_bytes=1)
    with delta.forward():
        hidden = model.blocks[0][1](model.blocks[0][0](x))  # ReLU output, saved by ReLU and Linear2
        ref = torch.utils.weak.WeakIdRef(hidden.untyped_storage())
        out = model.blocks[0][2](hidden).sum()
    del hidden
    gc.collect()
    assert ref() is None, "a swapped-out activation must not stay alive"
    assert delta.ledger.resident == 0
    out.backward()
    delta.end_step()
    delta.close()


def test_matches_independent_measure(zoo):
    for kind in ("gpt2", "bert"):
        base = zoo.build(kind)
        saved = zoo.saved_bytes(zoo.copy(base), kind)
        model = zoo.copy(base)
        delta = DeltaScheduler(model, memory_budget=10 * 2**30, profile_steps=1)
        stats = zoo.train(model, kind, delta, steps=2)
        profile, planned = stats[0][3], stats[1][3]
        assert profile["delta/kept_bytes"] + profile["delta/swapped_bytes"] == saved
        assert planned["delta/kept_bytes"] == saved == planned["delta/peak_bytes"]
        assert "planned" in delta.ledger.summary_table()
        delta.close()


def test_replans_when_shapes_change(zoo):
    model = zoo.build("gpt2")
    saved = zoo.saved_bytes(zoo.copy(model), "gpt2")
    delta = DeltaScheduler(model, memory_budget=2 * zoo.param_bytes(model) + saved // 2, profile_steps=1)
    a = zoo.train(model, "gpt2", delta, steps=2, seq=32)
    b = zoo.train(model, "gpt2", delta, steps=2, seq=16)
    assert len(delta.plans) == 2
    assert [s[3]["delta/profiling"] for s in a + b] == [1.0, 0.0, 1.0, 0.0]
    delta.close()


def test_microbatches_in_flight_share_the_allowance(zoo):
    """Two forwards before their backwards (GPipe-style), bitwise equal to the same accumulation unmanaged."""
    base = zoo.build("gpt2")
    saved = zoo.saved_bytes(zoo.copy(base), "gpt2")

    def run(model, delta):
        torch.manual_seed(1)
        out = []
        for _ in range(3):
            model.zero_grad()
            losses = []
            for _ in range(2):
                b = zoo.batch("gpt2")
                if delta is None:
                    losses.append(model(**b).loss)
                else:
                    with delta.forward():
                        losses.append(model(**b).loss)
            for loss in reversed(losses):
                loss.backward()
            stats = delta.end_step() if delta else None
            out.append((torch.stack(losses).detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, {}, stats))
        return out

    ref = run(zoo.copy(base), None)
    model = zoo.copy(base)
    allowance = int(0.8 * saved)  # for both micro-batches together
    delta = DeltaScheduler(model, memory_budget=2 * zoo.param_bytes(model) + allowance, profile_steps=1)
    got = run(model, delta)
    zoo.assert_same(ref, got)
    assert delta.in_flight == 2
    assert delta.forward_allowance == allowance // 2
    assert all(s[3]["delta/peak_bytes"] <= allowance for s in got)
    delta.close()


def test_standalone_step_context(zoo):
    base = zoo.build("bert")
    ref = zoo.train(zoo.copy(base), "bert", steps=3)
    model = zoo.copy(base)
    saved = zoo.saved_bytes(zoo.copy(base), "bert")
    delta = DeltaScheduler(model, memory_budget=2 * zoo.param_bytes(model) + int(0.4 * saved), profile_steps=1)
    torch.manual_seed(1)
    got = []
    for _ in range(3):
        b = zoo.batch("bert")
        model.zero_grad(set_to_none=True)
        with delta.step():
            loss = model(**b).loss
            loss.backward()
        got.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, {}, delta.last_stats))
    zoo.assert_same(ref, got)
    assert got[-1][3]["delta/peak_bytes"] <= int(0.4 * saved)
    assert len(delta.ledger.history) == 3
    delta.close()


def test_no_tensor_outlives_its_step(zoo):
    """Regression: replayed tensors once formed a cycle through C++ autograd nodes and leaked every step."""

    def live_bytes() -> int:
        gc.collect()
        return sum(o.numel() * o.element_size() for o in gc.get_objects()
                   if type(o) is torch.Tensor)

    base = zoo.build("gpt2")
    saved = zoo.saved_bytes(zoo.copy(base), "gpt2")
    for bandwidth in (1e3, 1e15):  # recompute-heavy, swap-only
        model = zoo.copy(base)
        delta = DeltaScheduler(model, memory_budget=2 * zoo.param_bytes(model) + int(0.4 * saved),
                               profile_steps=1, swap_bandwidth=bandwidth)
        zoo.train(model, "gpt2", delta, steps=2)
        before = live_bytes()
        zoo.train(model, "gpt2", delta, steps=3)
        assert live_bytes() == before
        assert delta.ledger.resident == 0
        delta.close()


def test_summary_states_what_the_ledger_counts_beside_the_process_peak(zoo):
    base = zoo.build("gpt2")
    delta = DeltaScheduler(base, memory_budget=10 * 2**30, profile_steps=1)
    stats = zoo.train(base, "gpt2", delta, steps=2)
    with open("/proc/self/status") as status:
        hwm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    for s in (s[3] for s in stats):
        # the real peak holds parameters, gradients, logits, temporaries: more than the saved activations
        assert s["delta/peak_bytes"] < s["delta/process_peak_bytes"] <= hwm
    table = delta.ledger.summary_table()
    assert "saved activations only" in table and "process peak RSS" in table
    assert f"{stats[-1][3]['delta/process_peak_bytes'] / 2**20:,.1f} MiB" in table
    delta.close()
