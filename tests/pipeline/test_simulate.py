"""Simulator against closed forms with unit costs, the memory model, recompute ratios, schedule choice."""

from __future__ import annotations

import json

import pytest

from lightning_merak.pipeline.plan import (
    LinkCosts,
    MemoryBudgetError,
    ScheduleError,
    StageCosts,
    choose_schedule,
    make_schedule,
    ratios_for_budget,
    resolve_ratios,
    simulate,
    stage_aware_ratios,
    to_chrome_trace,
)
from lightning_merak.pipeline.plan.simulate import with_ratios

UNIT = StageCosts(forward=1.0, backward=2.0, activation_bytes=1.0)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 4), (8, 16), (4, 2)])
def test_gpipe_and_1f1b_bubble_closed_form(name: str, p: int, m: int) -> None:
    if name == "1f1b" and m < p:  # torch's Schedule1F1B refuses fewer micro-batches than stages
        with pytest.raises(ScheduleError, match=rf"1f1b needs num_microbatches >= the {p} pipeline stages.*gpipe"):
            make_schedule(name, p, m)
        return
    r = simulate(make_schedule(name, p, m), UNIT)
    assert r.makespan == pytest.approx((m + p - 1) * 3)
    assert r.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize("p,m", [(4, 8), (4, 4), (2, 6), (8, 16)])
def test_1f1b_stage_i_holds_p_minus_i_microbatches(p: int, m: int) -> None:
    assert simulate(make_schedule("1f1b", p, m), UNIT).peak_memory == tuple(float(p - i) for i in range(p))
    assert simulate(make_schedule("gpipe", p, m), UNIT).peak_memory == (float(m),) * p


@pytest.mark.parametrize("p,m", [(4, 8), (2, 6), (8, 16)])
def test_interleaved_bubble_is_1f1b_bubble_divided_by_v(p: int, m: int) -> None:
    v = 2
    one = simulate(make_schedule("1f1b", p, m), UNIT)
    inter = simulate(make_schedule("interleaved_1f1b", p, m), UNIT.split(v))
    bubble_1f1b = one.makespan - m * 3                  # (p−1)(f+b) idle time per rank
    assert bubble_1f1b == pytest.approx((p - 1) * 3)
    assert inter.makespan - m * 3 == pytest.approx(bubble_1f1b / v)


def test_zbv_beats_interleaved_beats_1f1b_at_1f1b_memory() -> None:
    p, m = 4, 8
    one = simulate(make_schedule("1f1b", p, m), UNIT)
    inter = simulate(make_schedule("interleaved_1f1b", p, m), UNIT.split(2))
    zbv = simulate(make_schedule("zbv", p, m), UNIT.split(2))
    assert zbv.makespan == pytest.approx(25.5)          # ideal 24; torch's ZB-V order leaves 1.5 at the ends
    assert zbv.makespan < inter.makespan < one.makespan
    assert max(zbv.peak_memory_per_rank) == pytest.approx(p)   # p micro-batches of a full stage, as 1F1B's stage 0


def test_stage_0_input_gradient_is_empty_and_its_weight_step_carries_the_backward() -> None:
    """Stage 0 has no earlier stage to send an input gradient to: measured, its I is about 0 and W the whole
    backward. Hand-computed ZB-H1-like order, p=2, m=3, f=1, b=2 (stage 1: I=W=1; stage 0: I=0, W=2):
    rank 0 runs 0F0 [0,1] 0F1 [1,2], waits for 1I0 (ends 3): 0I0 [3,3] 0F2 [3,4], waits for 1I1 (ends 5): 0I1
    [5,5] 0W0 [5,7]; rank 1: 1F0 [1,2] 1I0 [2,3] 1F1 [3,4] 1I1 [4,5] 1W0 [5,6] 1F2 [6,7] 1I2 [7,8] 1W1 1W2 [8,10];
    rank 0 then 0I2 [8,8] 0W1 [8,10] 0W2 [10,12]: makespan 12. An even split would hide half of stage 0's
    backward in the waits for gradients (makespan 11), which the real stage 0 cannot do."""
    from lightning_merak.pipeline.plan.schedules import from_orders

    sched = from_orders("zb_h1", 3, ["0F0 0F1 0I0 0F2 0I1 0W0 0I2 0W1 0W2".split(),
                                     "1F0 1I0 1F1 1I1 1W0 1F2 1I2 1W1 1W2".split()])
    plain = StageCosts(1.0, 2.0)
    honest = simulate(sched, plain)
    assert honest.makespan == pytest.approx(12.0)
    spans = {(e.stage, e.kind): e.end - e.start for e in honest.timeline}
    assert spans[0, "I"] == 0.0 and spans[0, "W"] == 2.0 and spans[1, "I"] == spans[1, "W"] == 1.0
    even = StageCosts(1.0, 2.0, backward_input=1.0, backward_weight=1.0)   # given (e.g. measured): kept
    assert simulate(sched, [even, plain]).makespan == pytest.approx(11.0)
    assert plain.first_stage().input_grad == 0.0 and plain.first_stage().weight_grad == 2.0
    assert even.first_stage() is even


def test_zbv_two_ranks_hand_computed() -> None:
    """ZB-V, p=2, m=4, f=0.5, b=1 per virtual stage: each rank has 2 x 4 x 1.5 = 12 of work; rank 1 waits only for
    the first forward 0F0 (0.5) and then never idles (stage 0's W follows its empty I on rank 0): makespan 12.5."""
    result = simulate(make_schedule("zbv", 2, 4), UNIT.split(2))
    assert result.makespan == pytest.approx(12.5)
    assert result.busy == pytest.approx((12.0, 12.0))
    assert all(e.end == e.start for e in result.timeline if e.stage == 0 and e.kind == "I")
    assert all(e.end - e.start == 1.0 for e in result.timeline if e.stage == 0 and e.kind == "W")


def test_point_to_point_latency_and_bandwidth() -> None:
    """GPipe: each of the 2(p−1) hops on the critical path adds latency + bytes / bandwidth."""
    costs = StageCosts(1.0, 2.0, input_bytes=100.0)
    r = simulate(make_schedule("gpipe", 4, 8), costs, LinkCosts(latency=0.5, bandwidth=1000.0))
    assert r.makespan == pytest.approx(33 + 2 * 3 * 0.6)


def test_shifted_critical_path_hides_its_pre_recomputation() -> None:
    """Unit costs: the 8 whole-stage recomputes of S=4, M=8 all fit in bubbles; 1F1B + full recompute pays 11."""
    scp = simulate(make_schedule("shifted_critical_path", 4, 8), UNIT)
    assert scp.makespan == pytest.approx(33.0)
    assert sum(scp.recompute_time) == pytest.approx(8.0)
    full = simulate(make_schedule("1f1b", 4, 8), StageCosts(1.0, 2.0, recompute_ratio=1.0))
    assert full.makespan == pytest.approx(11 * 4)        # (m+p−1)(f + b + f)
    kinds = [e.kind for e in scp.timeline if e.rank == 2][:5]
    assert kinds == ["F", "F", "F", "R", "B"]             # 2F0pc 2F1pc 2F2, then Rc0 before B0


def test_memory_model_full_recompute_and_shifted_critical_path() -> None:
    a, x = 10.0, 1.0
    full = StageCosts(1.0, 2.0, activation_bytes=a, input_bytes=x, recompute_ratio=1.0)
    # stage i keeps p−i inputs; the micro-batch being backpropagated is rematerialised in full
    assert simulate(make_schedule("1f1b", 4, 8), full).peak_memory == (13.0, 12.0, 11.0, 10.0)
    plain = StageCosts(1.0, 2.0, activation_bytes=a, input_bytes=x)
    # stage 2 (S−2): F0pc F1pc F2 hold 1+1+10, then Rc0 rematerialises 9 more before B0
    assert simulate(make_schedule("shifted_critical_path", 4, 8), plain).peak_memory == (40.0, 30.0, 21.0, 10.0)


def test_stage_aware_ratios_merak_examples() -> None:
    assert stage_aware_ratios(0.9, 4) == pytest.approx([0.9, 0.85, 0.7, 0.0])
    assert stage_aware_ratios(0.6, 4) == pytest.approx([0.6, 0.4, 0.0, 0.0])   # −0.2 clipped
    assert stage_aware_ratios(0.9, 8) == pytest.approx([0.9, 0.88333, 0.86, 0.825, 0.76667, 0.65, 0.3, 0.0], abs=1e-5)
    with pytest.raises(ValueError, match="must lie in"):
        stage_aware_ratios(1.5, 4)


def test_resolve_ratios_modes() -> None:
    scp = make_schedule("shifted_critical_path", 4, 8)
    assert resolve_ratios("none", scp) == [0.0] * 4
    assert resolve_ratios("full", scp) == [1.0] * 4
    assert resolve_ratios(0.9, scp) == pytest.approx([0.9, 0.85, 0.85, 0.0])  # Merak: S−2 takes S−3's ratio
    assert resolve_ratios(0.9, make_schedule("1f1b", 4, 8)) == pytest.approx([0.9, 0.85, 0.7, 0.0])
    assert resolve_ratios("stage_aware", scp) == [0.0] * 4                     # no budget, no pressure
    with pytest.raises(ValueError, match="unknown"):
        resolve_ratios("selective", scp)


def test_ratios_for_budget_hand_computed() -> None:
    """1F1B, a=10, x=1, budget 20. Kept per micro-batch k = 10(1−r)+1; at a backward stage i holds
    (p−i−1)·k + 10. Stage 0: 3k+10 ≤ 20 → r ≥ 23/30; stage 1: 2k+10 ≤ 20 → r ≥ 0.6; stages 2, 3 fit at 0."""
    costs = [StageCosts(1.0, 2.0, activation_bytes=10.0, input_bytes=1.0)] * 4
    sched = make_schedule("1f1b", 4, 8)
    ratios = ratios_for_budget(sched, costs, 20.0)
    assert ratios == pytest.approx([23 / 30, 0.6, 0.0, 0.0], abs=2e-3)
    assert ratios[0] >= 23 / 30 - 1e-9 and ratios[1] >= 0.6 - 1e-9
    assert max(simulate(sched, with_ratios(costs, ratios)).peak_memory) <= 20.0
    assert ratios_for_budget(sched, costs, 20.0, layers_per_stage=10) == pytest.approx([0.8, 0.6, 0.0, 0.0])


def test_budget_no_recomputation_can_meet() -> None:
    costs = [StageCosts(1.0, 2.0, activation_bytes=10.0, input_bytes=1.0, static_bytes=2.0)] * 4
    with pytest.raises(MemoryBudgetError, match=r"pipeline rank 3 .* even with full recomputation"):
        ratios_for_budget(make_schedule("1f1b", 4, 8), costs, 5.0)
    with pytest.raises(MemoryBudgetError, match="no pipeline schedule fits"):
        choose_schedule(costs, 8, memory_budget=5.0)


def test_choose_schedule_prefers_shifted_critical_path_under_memory_pressure() -> None:
    costs = [StageCosts(1.0, 2.0, activation_bytes=10.0, input_bytes=1.0)] * 4
    choice = choose_schedule(costs, 8, memory_budget=20.0, candidates=["gpipe", "1f1b", "shifted_critical_path"])
    assert choice.name == "shifted_critical_path"
    sims = {n: o for n, o in choice.considered}
    assert set(sims) == {"gpipe", "1f1b", "shifted_critical_path"}
    one = simulate(make_schedule("1f1b", 4, 8), with_ratios(costs, ratios_for_budget(make_schedule("1f1b", 4, 8),
                                                                                     costs, 20.0)))
    assert choice.result.makespan < one.makespan
    assert "shortest simulated step" in choice.reason and "1f1b step" in choice.reason
    assert max(choice.result.peak_memory) <= 20.0


def test_choose_schedule_explains_skipped_candidates() -> None:
    choice = choose_schedule([UNIT] * 4, 3)
    sims = dict(choice.considered)
    assert sims["shifted_critical_path"].startswith("not applicable: shifted_critical_path needs num_microbatches >= 4")
    assert sims["zbv"].startswith("not applicable: zbv needs num_microbatches >= pp (4)")
    assert choice.name == "interleaved_1f1b"                 # rounds = 1: any count is allowed


def test_chrome_trace_of_simulation_and_real_records(tmp_path) -> None:
    r = simulate(make_schedule("shifted_critical_path", 2, 4), UNIT)
    trace = to_chrome_trace(r.timeline, time_unit=1e-3)
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(r.timeline) == 2 * 4 * 2 + 2    # F and B of 4 micro-batches on 2 ranks + 2 recomputes
    first = next(e for e in xs if e["name"] == "0R0")
    assert first["tid"] == 0 and first["dur"] == pytest.approx(1000.0)   # 1 ms in µs
    json.dumps(trace)
    real = to_chrome_trace([{"rank": 1, "action": "1B3", "start": 0.5, "end": 0.75}, (0, "0F0pc", 0.0, 0.25)])
    xs = sorted((e for e in real["traceEvents"] if e["ph"] == "X"), key=lambda e: e["tid"])
    assert [(e["name"], e["cat"], e["ts"], e["dur"]) for e in xs] == [("0F0pc", "F", 0.0, 250000.0),
                                                                        ("1B3", "B", 500000.0, 250000.0)]


def test_gantt_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from lightning_merak.pipeline.plan import plot_gantt

    path = plot_gantt(simulate(make_schedule("1f1b", 4, 8), UNIT).timeline, tmp_path / "g.png", title="1f1b")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_measured_costs_replace_modelled_times():
    """Median forward/backward per stage from real timeline events; pre-checkpointed (no_grad) forwards are
    ignored and the checkpointed share is taken out of the backward; a stage without events is rescaled."""
    from lightning_merak.pipeline.plan.simulate import measured_costs

    def ev(action, start, end):
        return {"rank": 0, "action": action, "start": start, "end": end}

    events = [ev("0F0", 0.0, 1.0), ev("0F1", 1.0, 3.0), ev("0F2", 3.0, 4.5), ev("0F3pc", 5.0, 5.1),
              ev("0B0", 6.0, 10.0), ev("0B1rc", 10.0, 14.0), ev("0R1", 9.0, 10.0),
              ev("1F0", 0.0, 0.5), ev("1B0", 1.0, 2.0)]
    modelled = [StageCosts(forward=10.0, backward=20.0, activation_bytes=7.0),
                StageCosts(forward=5.0, backward=10.0), StageCosts(forward=4.0, backward=8.0)]
    costs = measured_costs(events, modelled, ratios=[0.5, 0.0, 0.0])
    assert costs[0].forward == 1.5 and costs[0].backward == 4.0 - 0.5 * 1.5
    assert costs[0].activation_bytes == 7.0   # bytes stay as modelled
    assert costs[1].forward == 0.5 and costs[1].backward == 1.0
    # stage 2 has no events: modelled times x median measured/modelled forward ratio (0.15, 0.1) -> 0.125
    assert costs[2].forward == pytest.approx(0.5) and costs[2].backward == pytest.approx(1.0)
