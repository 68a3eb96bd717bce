"""Rank-local sections on 2 gloo processes, in one launch: a section that fails on one rank is raised on every
rank at once (the failing one its own error, the others ``PeerFailure`` naming it), instead of leaving the others
in the collective that follows; a section that succeeds hands its result to every rank."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_merak import failures
from lightning_merak.checkpoint import save_sharded
from tests.helpers.launch import spawn


def _outcome(fn) -> tuple[str, str, float]:
    start = time.perf_counter()
    try:
        fn()
        return "ok", "", time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 - the test reports what each rank raised
        return type(err).__name__, str(err), time.perf_counter() - start


def _worker(rank: int, world: int, folder: str) -> dict:
    def fail_on(who: int):
        def section():
            if rank == who:
                raise KeyError(f"broken on rank {who}")
            return rank
        return section

    out = {"broadcast": failures.rank_local(lambda: {"chosen": "1f1b"}, "a choice", runs=rank == 0),
           "agreed": failures.agree(lambda: rank * 10, "a check")}
    out["local_fails"] = _outcome(lambda: failures.rank_local(fail_on(0), "rank 0's section", runs=rank == 0))
    out["agree_fails"] = _outcome(lambda: failures.agree(fail_on(1), "a check on every rank"))
    # a checkpoint whose Lightning entries rank 0 cannot pickle: rank 1 must not wait for rank 0's meta.pt
    module = nn.Linear(2, 2)
    out["save_fails"] = _outcome(lambda: save_sharded(
        Path(folder) / "x.ckpt", {"epoch": 0, "hook": lambda: None}, module, [], rank == 0))
    torch.distributed.barrier()  # both ranks are still in step: the collectives above all matched
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn(_worker, 2, str(tmp_path_factory.mktemp("sections")), timeout=120)


@pytest.mark.multiprocess
def test_results_reach_every_rank(ranks):
    for res in ranks:
        assert res["broadcast"] == {"chosen": "1f1b"} and res["agreed"] == [0, 10][ranks.index(res)]


@pytest.mark.multiprocess
def test_a_section_failing_on_one_rank_is_raised_on_all(ranks):
    kind, message, _ = ranks[0]["local_fails"]
    assert kind == "KeyError" and "broken on rank 0" in message
    kind, message, seconds = ranks[1]["local_fails"]
    assert kind == "PeerFailure" and seconds < 5
    assert message.startswith("rank 0 failed in rank 0's section, so this rank stops too: KeyError: 'broken on rank 0'")
    assert "rank 0's traceback:" in message and "raise KeyError" in message
    assert ranks[1]["agree_fails"][0] == "KeyError"
    kind, message, _ = ranks[0]["agree_fails"]
    assert kind == "PeerFailure" and message.startswith("rank 1 failed in a check on every rank")


@pytest.mark.multiprocess
def test_checkpoint_meta_failure_on_rank_zero_stops_both(ranks):
    kind, message, _ = ranks[0]["save_fails"]
    assert kind != "ok" and "lambda" in message.lower(), message
    kind, message, seconds = ranks[1]["save_fails"]
    assert kind == "PeerFailure" and "rank 0 failed in writing the checkpoint's meta.pt" in message and seconds < 30
