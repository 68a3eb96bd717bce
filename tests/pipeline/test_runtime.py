"""Runtime: every schedule, on real gloo processes, gives the single-process gradients.

Stages are slices of one ``nn.Sequential`` (8 Linear+Tanh blocks); the loss is a sum of squares per
micro-batch (``scale_grads=False``), so the reference is one backward of the summed loss.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers.launch import spawn

WIDTH, BLOCKS, MB_SIZE = 8, 8, 2


def make_model(dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(BLOCKS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
        if dropout:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def split(model: nn.Sequential, parts: int) -> list[nn.Sequential]:
    per = len(model) // parts
    return [nn.Sequential(*list(model)[i * per:(i + 1) * per]) for i in range(parts)]


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output - target) ** 2).sum()


def data(n_mb: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n_mb * MB_SIZE, WIDTH, generator=g), torch.randn(n_mb * MB_SIZE, WIDTH, generator=g)


def reference_grads(n_mb: int, parts: int) -> list[dict[str, torch.Tensor]]:
    model = make_model()
    x, y = data(n_mb)
    total = sum(loss_fn(model(xm), ym) for xm, ym in zip(x.chunk(n_mb), y.chunk(n_mb), strict=True))
    total.backward()
    return [{k: p.grad.clone() for k, p in part.named_parameters()} for part in split(model, parts)]


def run_schedule(rank: int, world: int, name: str, n_mb: int, *, dropout: float = 0.0, table=None,
                 record: bool = False, steps: int = 1) -> dict:
    """One training step of ``name``; returns {global stage index: {param name: grad}} and the losses."""
    from torch.distributed.pipelining import PipelineStage

    from lightning_merak.pipeline.plan.schedules import MULTI_STAGE_SCHEDULES, make_schedule
    from lightning_merak.pipeline.runtime import build_schedule

    plan = make_schedule(name, world, n_mb)
    local = plan.stages_of(rank) if name in MULTI_STAGE_SCHEDULES else [rank]
    parts = split(make_model(dropout), plan.num_stages)
    stages = [PipelineStage(parts[i], i, plan.num_stages, torch.device("cpu")) for i in local]
    sched = build_schedule(name, stages if len(stages) > 1 else stages[0], n_mb, loss_fn, recompute_table=table,
                           record_timeline=record)
    x, y = data(n_mb)
    torch.manual_seed(100 + rank)
    losses: list = []
    args = (x,) if 0 in local else ()
    target = y if plan.num_stages - 1 in local else None
    for _ in range(steps):   # gradients accumulate over steps: the schedule object is reused, as in training
        sched.step(*args, target=target, losses=losses)
    return {"grads": {i: {k: p.grad.clone() for k, p in parts[i].named_parameters()} for i in local},
            "losses": [float(v) for v in losses], "events": list(getattr(sched, "timeline_events", [])),
            "runtime": type(sched).__name__}


def run_forward_only(rank: int, world: int, n_mb: int):
    from torch.distributed.pipelining import PipelineStage

    from lightning_merak.pipeline.runtime import forward_only_schedule

    part = split(make_model(), world)[rank]
    sched = forward_only_schedule(PipelineStage(part, rank, world, torch.device("cpu")), n_mb)
    x, _ = data(n_mb)
    with torch.no_grad():
        return sched.step(x) if rank == 0 else sched.step()


def worker(rank: int, world: int, n_mb: int) -> dict:
    names = ["gpipe", "1f1b", "shifted_critical_path", "interleaved_1f1b", "zbv"]
    out = {name: run_schedule(rank, world, name, n_mb) for name in names}
    # The action-list runtime with our handlers for every kind (F, B, I, W, V-local hand-off), recording times.
    out["1f1b_recorded"] = run_schedule(rank, world, "1f1b", n_mb, record=True)
    out["zbv_recorded"] = run_schedule(rank, world, "zbv", n_mb, record=True)
    out["forward_only"] = run_forward_only(rank, world, n_mb)
    out["scp_two_steps"] = run_schedule(rank, world, "shifted_critical_path", n_mb, steps=2)
    # Dropout: Merak's pre-checkpointed order must equal the same order without recomputation, bitwise; this
    # only holds if the recompute replays the RNG state of the pre-checkpointed forward.
    out["dropout_pc"] = run_schedule(rank, world, "shifted_critical_path", n_mb, dropout=0.3)
    out["dropout_plain"] = run_schedule(rank, world, "shifted_critical_path", n_mb, dropout=0.3, table=())
    return out


def check(results: list[dict], world: int, n_mb: int) -> None:
    for name in ["gpipe", "1f1b", "shifted_critical_path", "1f1b_recorded"]:
        ref = reference_grads(n_mb, world)
        for rank, res in enumerate(results):
            for k, g in ref[rank].items():
                torch.testing.assert_close(res[name]["grads"][rank][k], g, rtol=0, atol=1e-6, msg=f"{name} rank {rank} {k}")
    for name in ["interleaved_1f1b", "zbv", "zbv_recorded"]:
        ref = reference_grads(n_mb, 2 * world)
        got = {i: g for res in results for i, g in res[name]["grads"].items()}
        assert sorted(got) == list(range(2 * world))
        for i, grads in got.items():
            for k, g in ref[i].items():
                torch.testing.assert_close(grads[k], g, rtol=0, atol=1e-6, msg=f"{name} stage {i} {k}")
    for res in results:
        for i, grads in res["dropout_pc"]["grads"].items():
            for k, g in grads.items():
                assert torch.equal(g, res["dropout_plain"]["grads"][i][k]), f"dropout stage {i} {k}"
    ref = reference_grads(n_mb, world)
    for rank, res in enumerate(results):
        for k, g in ref[rank].items():
            torch.testing.assert_close(res["scp_two_steps"]["grads"][rank][k], 2 * g, rtol=1e-6, atol=1e-5)
    assert results[0]["shifted_critical_path"]["runtime"] == "ActionListSchedule"
    assert results[0]["1f1b"]["runtime"] == "Schedule1F1B"
    for rank, res in enumerate(results):   # one record per compute action, in the planned order
        planned = [a for a in _plan("1f1b", world, n_mb).orders()[rank]]
        assert [e["action"] for e in res["1f1b_recorded"]["events"]] == planned
        assert all(0 <= e["start"] <= e["end"] for e in res["1f1b_recorded"]["events"])
        assert len(res["zbv_recorded"]["events"]) == 3 * 2 * n_mb     # F, I, W for two stages
        assert [e["action"] for e in res["shifted_critical_path"]["events"]] == []   # not recorded unless asked
    model = make_model()
    x, _ = data(n_mb)
    torch.testing.assert_close(results[-1]["forward_only"], model(x).detach(), rtol=0, atol=1e-6)
    last = results[-1]
    assert len(last["1f1b"]["losses"]) == n_mb
    assert last["shifted_critical_path"]["losses"] == pytest.approx(last["1f1b"]["losses"], abs=1e-5)
    assert last["dropout_pc"]["losses"] == last["dropout_plain"]["losses"]


def _plan(name: str, world: int, n_mb: int):
    from lightning_merak.pipeline.plan.schedules import make_schedule

    return make_schedule(name, world, n_mb)


@pytest.mark.multiprocess
@pytest.mark.parametrize("world", [2, 4])
def test_schedules_match_single_process(world: int) -> None:
    n_mb = 4 if world == 2 else 8
    results = spawn(worker, world, n_mb, timeout=90)
    check(results, world, n_mb)


def test_build_schedule_rejects_bad_input() -> None:
    from lightning_merak.pipeline.plan.schedules import ScheduleError
    from lightning_merak.pipeline.runtime import build_schedule

    class FakeStage:
        group_size = 4

    with pytest.raises(ScheduleError, match="unknown pipeline schedule 'pipedream'"):
        build_schedule("pipedream", FakeStage(), 8, loss_fn)
    with pytest.raises(ScheduleError, match="runs 2 stage"):
        build_schedule("zbv", FakeStage(), 8, loss_fn)
    with pytest.raises(ScheduleError, match="num_microbatches >= 4"):
        build_schedule("shifted_critical_path", FakeStage(), 3, loss_fn)
