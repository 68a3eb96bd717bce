"""Memory-aware partition: under ``memory_budget`` the balancing programme admits only stages that fit.

A GPT-2 with a large vocabulary (tied embedding on the first and last stages): FLOPs alone put the embedding
beside as many blocks as any other stage gets, so its stage holds the most bytes. The figures are checked against
the module's own parameters and a brute force over every legal cut.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import transformers as tf

from lightning_merak.partition import PartitionError, PartitionPlan, plan_model
from lightning_merak.partition.plan import crossing
from lightning_merak.pipeline.plan import make_schedule, simulate
from lightning_merak.pipeline.plan.recompute import ratios_for_budget
from lightning_merak.pipeline.plan.simulate import with_ratios

STAGES, MICRO = 3, 4
_plan = functools.partial(plan_model, optimizer_states=0)  # plain SGD: weights + gradients


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=8, n_embd=32, n_head=2, n_positions=16, vocab_size=2048))
    ids = torch.randint(0, 2048, (2, 16))
    return model, ((), {"input_ids": ids, "labels": ids})


def _held(model, units) -> int:
    """Weight bytes of a stage, each tensor once (the tied lm_head/wte pair counts on each stage holding it)."""
    return sum(p.numel() * p.element_size()
               for p in {id(p): p for u in units for p in model.get_submodule(u).parameters()}.values())


def _needs(plan, model, cuts: list[int]) -> list[int]:
    """Static (weights + gradients) plus the full-recompute activation floor under 1F1B, per stage."""
    cap, n = plan.capture, len(plan.units)
    bounds = [0, *cuts, n]
    needs = []
    for s, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        received = sum(torch.Size(cap.tensors[k]["shape"]).numel() * 4 for k in crossing(cap, a)[0]) if a else 0
        in_flight = min(STAGES - s, MICRO)
        needs.append(2 * _held(model, plan.units[a:b]) + sum(cap.unit_saved[a:b]) + (in_flight - 1) * received)
    return needs


def _worst_compute(plan, cuts: list[int]) -> int:
    bounds = [0, *cuts, len(plan.units)]
    return max(sum(3 * f + 1 for f in plan.capture.unit_flops[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))


def _legal_cuts(plan) -> list[list[int]]:
    cap = plan.capture
    points = [k for k in range(1, len(plan.units)) if cap.first_call[k] >= 0 and crossing(cap, k)[1] is None]
    return [list(c) for c in itertools.combinations(points, STAGES - 1)]


def test_budget_moves_the_cut_to_the_least_compute_among_fitting_cuts(gpt):
    model, example = gpt
    free = _plan(model, example, STAGES, num_microbatches=MICRO)
    free_needs = _needs(free, model, free.cuts)
    # the compute-balanced cut does not fit; a tighter cut exists (checked by the brute force below)
    budget = max(free_needs) - 1
    plan = _plan(model, example, STAGES, memory_budget=budget, num_microbatches=MICRO)
    needs = _needs(plan, model, plan.cuts)
    assert plan.cuts != free.cuts and plan.compute_cuts == free.cuts
    assert [s.static for s in plan.stages] == [2 * _held(model, s.units) for s in plan.stages]
    assert [s.static + s.reserve for s in plan.stages] == needs and max(needs) <= budget
    assert plan.stages[-1].static == 2 * _held(model, plan.stages[-1].units) > 2 * _held(model, ["lm_head"]) > 0
    fitting = [c for c in _legal_cuts(plan) if max(_needs(plan, model, c)) <= budget]
    assert fitting and _worst_compute(plan, plan.cuts) == min(_worst_compute(plan, c) for c in fitting)
    table = plan.table()
    assert "cuts moved to fit memory_budget" in table and f"compute balance {plan.balance:.2f} instead of " \
        f"{free.balance:.2f}" in table, table
    back = PartitionPlan.from_json(plan.to_json())  # the JSON keeps the modelled bytes and the budget
    assert back.memory_budget == budget and [(s.static, s.reserve) for s in back.stages] == [
        (s.static, s.reserve) for s in plan.stages] and "per stage static + activation reserve" in back.table()
    # the recompute ratios are solved on the same static bytes: the cut that fits leaves a ratio that fits
    sched = make_schedule("1f1b", STAGES, MICRO)
    costs = plan.stage_costs()
    assert [c.static_bytes for c in costs] == [s.static for s in plan.stages]
    ratios = ratios_for_budget(sched, costs, budget)
    peaks = simulate(sched, with_ratios(costs, ratios)).peak_memory_per_rank
    assert all(c.static_bytes + p <= budget for c, p in zip(costs, peaks, strict=True))
    full = simulate(sched, with_ratios(costs, [1.0] * STAGES)).peak_memory_per_rank
    assert [c.static_bytes + p for c, p in zip(costs, full, strict=True)] == needs


def test_without_a_budget_the_cut_is_balanced_by_flops_alone(gpt):
    model, example = gpt
    free = _plan(model, example, STAGES)
    roomy = _plan(model, example, STAGES, memory_budget=10 * max(_needs(free, model, free.cuts)))
    assert free.cuts == roomy.cuts and roomy.compute_cuts is None and free.memory_budget is None
    assert _worst_compute(free, free.cuts) == min(_worst_compute(free, c) for c in _legal_cuts(free))
    assert "cuts moved" not in roomy.table() and "memory_budget" not in free.table()


def test_impossible_budget_names_the_least_worst_stage(gpt):
    model, example = gpt
    free = _plan(model, example, STAGES, num_microbatches=MICRO)
    least = min(max(_needs(free, model, c)) for c in _legal_cuts(free))
    with pytest.raises(PartitionError) as err:
        _plan(model, example, STAGES, memory_budget=least - 1, num_microbatches=MICRO)
    message = str(err.value)
    assert f"memory_budget={least - 1} bytes" in message and f"needs {least} bytes" in message, message
    assert "more pipeline stages" in message and "tensor parallelism" in message and "ZeRO" in message
    assert _plan(model, example, STAGES, memory_budget=least, num_microbatches=MICRO).stages


def test_optimizer_state_and_delta_change_the_model(gpt):
    model, example = gpt
    adam = plan_model(model, example, STAGES, memory_budget=10**9)  # unless told: Adam's two moments
    assert [s.static for s in adam.stages] == [4 * _held(model, s.units) for s in adam.stages]
    delta = _plan(model, example, STAGES, memory_budget=10**9, memory_manager="delta")
    assert [s.reserve for s in delta.stages] == [0] * STAGES  # DELTA checks its own floor from measured sizes
    with pytest.raises(ValueError, match="optimizer_states=-1 must be a number >= 0"):
        plan_model(model, example, STAGES, optimizer_states=-1)
    with pytest.raises(ValueError, match="memory_budget=0 must be a whole number of bytes"):
        _plan(model, example, STAGES, memory_budget=0)


def test_hand_written_partition_over_budget_is_kept_and_said(gpt):
    model, example = gpt
    with pytest.warns(UserWarning, match=r"does not fit memory_budget=.* stage 0 needs"):
        plan = _plan(model, example, STAGES, partition=["transformer.h.6", "transformer.h.7"],
                          memory_budget=2 * _held(model, ["transformer.wte"]))
    assert plan.units[plan.cuts[0]] == "transformer.h.6"


def test_tensor_parallel_bytes_are_per_rank(gpt):
    from lightning_merak.tensor_parallel import tp_plan_for

    model, example = gpt
    tp = tp_plan_for(model, 2, example)
    plan = _plan(model, example, STAGES, tp_plan=tp)
    styles = tp.styles
    for st in plan.stages:
        expected = {}
        for u in st.units:
            for name, p in model.get_submodule(u).named_parameters():
                owner = f"{u}.{name}".rsplit(".", 1)[0]
                split = owner in styles and not (styles[owner] == "rowwise" and name.endswith("bias"))
                expected[id(p)] = p.numel() // 2 * 4 if split else p.numel() * 4
        assert st.static == 2 * sum(expected.values()), st.index
    assert sum(s.static for s in plan.stages) < sum(2 * _held(model, s.units) for s in plan.stages)


def test_two_stages_per_rank_share_the_device_budget(gpt):
    from lightning_merak.parallelize import plan_stages

    model, example = gpt
    free = _plan(model, example, 4)
    budget = 2 * max(s.static + s.reserve for s in free.stages) - 2
    # zero-bubble V: stages 0 and 3 on rank 0
    plan = plan_stages(model, example, (0, 1, 1, 0), "auto", budget, optimizer_states=0)
    assert plan.memory_budget == budget // 2 and max(s.static + s.reserve for s in plan.stages) <= budget // 2
