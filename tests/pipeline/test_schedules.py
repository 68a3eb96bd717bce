"""Schedules as data: exact orders (merak.md §7, S=4, M=8), torch's deadlock check, micro-batch rules."""

from __future__ import annotations

import pytest

from lightning_merak.pipeline.plan.schedules import (
    SCHEDULE_NAMES,
    ScheduleError,
    from_orders,
    make_schedule,
    shifted_critical_path,
    to_torch_actions,
    validate,
)


def test_1f1b_orders_match_merak_listing() -> None:
    orders = make_schedule("1f1b", 4, 8).orders()
    assert orders[0] == "0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0F6 0B3 0F7 0B4 0B5 0B6 0B7".split()
    assert orders[2] == "2F0 2F1 2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4 2F6 2B5 2F7 2B6 2B7".split()
    assert orders[3][:4] == ["3F0", "3B0", "3F1", "3B1"]


def test_shifted_critical_path_exact_orders_s4_m8() -> None:
    """merak.md §7 lists buffer ids; mapped to micro-batches (buffers cycle per stage) they read as below."""
    orders = shifted_critical_path(4, 8).orders()
    # s0: cool-down micro-batches M − mb + s < S (5, 6, 7) pre-checkpointed, recomputed before their gradient.
    assert orders[0] == "0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5pc 0B2 0F6pc 0B3 0F7pc 0B4 0B5rc 0B6rc 0B7rc".split()
    # s1 = S−3: Fpc0 F1 F2 Rc0+B0 F3 B1 F0 B2 F1 B3 Fpc2 B0 Fpc3 B1 Rc2+B2 Rc3+B3 (4 buffers).
    assert orders[1] == "1F0pc 1F1 1F2 1B0rc 1F3 1B1 1F4 1B2 1F5 1B3 1F6pc 1B4 1F7pc 1B5 1B6rc 1B7rc".split()
    # s2 = S−2: Fpc0 Fpc1 F2 Rc0+B0 Rc1+B1 F0 B2 F1 B0 F2 B1 F0 B2 F1 B0 B1 (3 buffers): extra early forward.
    assert orders[2] == "2F0pc 2F1pc 2F2 2B0rc 2B1rc 2F3 2B2 2F4 2B3 2F5 2B4 2F6 2B5 2F7 2B6 2B7".split()
    # s3: F B F B ..., no recomputation on the last stage.
    assert orders[3] == [f"3{k}{mb}" for mb in range(8) for k in "FB"]
    assert shifted_critical_path(4, 8).pre_checkpointed() == {(0, 5), (0, 6), (0, 7), (1, 0), (1, 6), (1, 7),
                                                              (2, 0), (2, 1)}


def test_shifted_critical_path_p2_keeps_the_extra_forward() -> None:
    assert shifted_critical_path(2, 4).orders()[0] == "0F0pc 0F1pc 0F2 0B0rc 0B1rc 0F3 0B2 0B3".split()


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("p,m", [(2, 4), (3, 6), (4, 8), (4, 12), (8, 16)])
def test_every_schedule_passes_torch_deadlock_check(name: str, p: int, m: int) -> None:
    sched = make_schedule(name, p, m)
    validate(sched)
    assert sum(len(r) for r in to_torch_actions(sched)) == sum(len(r) for r in sched.actions)
    stages_per_rank = 2 if name in ("interleaved_1f1b", "zbv") else 1
    assert sched.num_stages == stages_per_rank * p


def test_interleaved_and_zbv_placements() -> None:
    assert make_schedule("interleaved_1f1b", 4, 8).stage_to_rank == (0, 1, 2, 3, 0, 1, 2, 3)
    assert make_schedule("zbv", 4, 8).stage_to_rank == (0, 1, 2, 3, 3, 2, 1, 0)
    assert make_schedule("zbv", 2, 4).orders()[1][:6] == ["1F0", "2F0", "1F1", "2F1", "2I0", "2W0"]


@pytest.mark.parametrize("p,m", [(2, 4), (3, 5), (4, 8), (4, 10)])
def test_interleaved_and_zbv_equal_torchs_own_orders(p: int, m: int) -> None:
    """Same per-rank compute orders as torch's classes (their order generators need no stages)."""
    from types import SimpleNamespace

    from torch.distributed.pipelining import ScheduleInterleaved1F1B, ScheduleZBVZeroBubble

    rounds = max(1, m // p)
    ns = SimpleNamespace(n_local_stages=2, pp_group_size=p, microbatches_per_round=m // rounds, _n_microbatches=m,
                         num_stages=2 * p)
    for cls, name in [(ScheduleInterleaved1F1B, "interleaved_1f1b"), (ScheduleZBVZeroBubble, "zbv")]:
        ours = make_schedule(name, p, m)
        for rank in range(p):
            theirs = [str(a) for a in cls._calculate_single_rank_operations(ns, rank) if a is not None]
            assert [str(a) for a in to_torch_actions(ours)[rank]] == theirs, (name, rank)


def test_validate_catches_a_deadlock_and_a_backward_before_forward() -> None:
    # rank 0 waits for 1B0 before sending 0F1, rank 1 wants 0F1 before running 1B0: a cycle.
    deadlock = from_orders("bad", 2, [["0F0", "0B0", "0F1", "0B1"], ["1F0", "1F1", "1B0", "1B1"]])
    with pytest.raises(ScheduleError, match="deadlock"):
        validate(deadlock)
    early = from_orders("bad", 1, [["0B0", "0F0"], ["1F0", "1B0"]])
    with pytest.raises(ScheduleError, match="comes before the forward"):
        validate(early)
    missing = from_orders("bad", 2, [["0F0", "0B0"], ["1F0", "1B0"]])
    with pytest.raises(ScheduleError, match="forward 0F1 is missing"):
        validate(missing)


@pytest.mark.parametrize("m", [1, 2, 3])
def test_shifted_critical_path_needs_four_microbatches(m: int) -> None:
    with pytest.raises(ScheduleError, match=rf"num_microbatches >= 4 .* got {m}"):
        shifted_critical_path(2, m)


def test_shifted_critical_path_needs_at_least_p_microbatches() -> None:
    with pytest.raises(ScheduleError, match="pipeline_schedule='1f1b'"):
        shifted_critical_path(8, 6)


def test_interleaved_rounds_rule_and_zbv_minimum() -> None:
    with pytest.raises(ScheduleError, match="multiple of the number of rounds"):
        make_schedule("interleaved_1f1b", 4, 9)   # rounds = 2, 9 % 2 != 0
    make_schedule("interleaved_1f1b", 4, 10)      # rounds = 2: allowed (torch's relaxed rule)
    with pytest.raises(ScheduleError, match="zbv needs num_microbatches >= pp"):
        make_schedule("zbv", 4, 3)
    with pytest.raises(ScheduleError, match="unknown pipeline schedule"):
        make_schedule("dualpipe", 4, 8)


@pytest.mark.parametrize("p,m", [(2, 1), (4, 3)])
def test_1f1b_needs_as_many_microbatches_as_stages(p: int, m: int) -> None:
    """torch's Schedule1F1B raises inside the first step with fewer micro-batches than stages: refused when the
    schedule is built, so ``MerakConfig`` refuses it at ``Trainer(...)`` time and "auto" skips it (gpipe runs)."""
    from lightning_merak.config import MerakConfig, MerakConfigError

    with pytest.raises(ScheduleError, match=rf"1f1b needs num_microbatches >= the {p} pipeline stages.*got {m}"):
        make_schedule("1f1b", p, m)
    with pytest.raises(MerakConfigError, match=rf"pipeline_schedule='1f1b' cannot run num_microbatches={m} on "
                                               rf"pipeline_parallel_size={p}.*at least {p} micro-batches.*'gpipe'"):
        MerakConfig(pipeline_parallel_size=p, num_microbatches=m, pipeline_schedule="1f1b")
    auto = MerakConfig(pipeline_parallel_size=p, num_microbatches=m).schedule_candidates()
    assert "1f1b" not in auto and "gpipe" in auto
    make_schedule("1f1b", p, p)
