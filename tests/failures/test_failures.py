"""An exception on one rank ends every rank fast, with the original error in the output, far within the process
groups' timeout (300 s here). Two gloo processes at pp=2 (1F1B: rank 0 holds the first stage, rank 1 the last);
one launch per case, since a failure ends the run. Each launch has a hard limit of ``LIMIT`` seconds, start-up
included; the time from the failure to the end of the last process is measured separately."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.helpers.launch import REPO, run_script

SCRIPT = REPO / "tests/failures/fit.py"
LIMIT = 60  # seconds per launch (imports, rendezvous, setup, two steps, the failure)
TIMEOUT_S = 300  # the strategy's process-group timeout: a rank left waiting would take this long
AFTER_FAILURE = 15  # seconds from the failure to the end of every process
PIPELINE = {"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b"}


def _launch(tmp_path: Path, cfg: dict) -> tuple[str, int, float | None]:
    """(output of every rank, exit code, seconds from the failure to the end of the last process)."""
    result = run_script(SCRIPT, str(tmp_path), json.dumps({"timeout_s": TIMEOUT_S, **cfg}), timeout=LIMIT)
    ended = time.time()  # run_script returns once every process closed the output pipe: all have ended
    marker = tmp_path / "fail_time"
    after = ended - float(marker.read_text()) if marker.exists() else None
    assert not list(tmp_path.glob("rank*.pt")), "a rank finished its fit"
    return result.stdout, result.returncode, after


@pytest.mark.multiprocess
@pytest.mark.timeout(LIMIT + 30)
def test_user_error_on_the_last_stage_inside_the_schedule(tmp_path):
    # raised after the model call: on the last stage only, inside the schedule while rank 0 waits to receive
    out, code, after = _launch(tmp_path, {"strategy": PIPELINE,
                                          "fail": {"how": "raise_after_model", "step": 2}})
    assert code != 0 and after is not None and after < AFTER_FAILURE, (after, out[-3000:])
    assert "ValueError: user error after the model call at step 2" in out
    assert "Merak: rank 0 stops because a peer rank failed or ended first" in out


@pytest.mark.multiprocess
@pytest.mark.timeout(LIMIT + 30)
def test_user_error_on_the_first_stage(tmp_path):
    # raised before the model call, on rank 0 only: the first stage's capture, while rank 1 waits in its schedule
    out, code, after = _launch(tmp_path, {"strategy": PIPELINE,
                                          "fail": {"how": "raise_before_model", "rank": 0, "step": 2}})
    assert code != 0 and after is not None and after < AFTER_FAILURE, (after, out[-3000:])
    assert "ValueError: user error before the model call on rank 0 at step 2" in out
    assert "Merak: rank 1 stops because a peer rank failed or ended first" in out


@pytest.mark.multiprocess
@pytest.mark.timeout(LIMIT + 30)
@pytest.mark.parametrize("rank", [1, 0])
def test_sigkill_of_one_rank(tmp_path, rank):
    # rank 0 is Lightning's launching process and the rendezvous store's host: the others are left orphaned
    out, code, after = _launch(tmp_path, {"strategy": PIPELINE, "fail": {"how": "sigkill", "rank": rank, "step": 2}})
    assert code != 0 and after is not None and after < AFTER_FAILURE, (after, out[-3000:])
    assert f"test: SIGKILL of rank {rank} at step 2" in out
    assert f"Merak: rank {1 - rank} stops because a peer rank failed or ended first" in out


@pytest.mark.multiprocess
@pytest.mark.timeout(LIMIT + 30)
def test_delta_budget_error_on_one_stage_only(tmp_path):
    # 420,000 bytes: stage 0 (two micro-batches in flight under 1F1B) needs 427,904, stage 1 fits; the check runs
    # on each stage at the end of step 0, while the other waits in the next collective
    strategy = {**PIPELINE, "num_microbatches": 4, "recompute": "none", "memory_manager": "delta",
                "memory_budget": 420_000}
    out, code, _ = _launch(tmp_path, {"model": "gpt2", "strategy": strategy})
    assert code != 0
    assert "MerakConfigError: memory_budget=420000 bytes (410.2 KiB) is below the minimum of 427904 bytes" in out, \
        out[-3000:]
    # rank 1 raises rank 0's error, with its traceback, instead of waiting; it had no error of its own
    assert "PeerFailure: rank 0 failed in DELTA's memory budget check, so this rank stops too: MerakConfigError: " \
           "memory_budget=420000" in out
    assert "rank 1 failed in" not in out
