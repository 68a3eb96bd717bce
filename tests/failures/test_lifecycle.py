"""Resources are released and runs end cleanly: two fits in one process (each a new Trainer and strategy) give the
same losses, the second does not add to the first's process groups, and nothing the strategy installed outlives
a fit; a tensor-parallel fit exits with code 0 every time."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.launch import REPO, check_script, run_script

SCRIPT = REPO / "tests/failures/fit.py"


@pytest.mark.multiprocess
def test_two_fits_in_one_process_equal_a_fresh_run(tmp_path):
    # tied embeddings across the two stages (a group of their own) and DELTA (hooks, a swap file, its prefetch
    # thread) at pp=2: the first fit is a fresh run, the second must repeat it exactly
    strategy = {"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b", "num_microbatches": 4, "recompute": "none",
                "memory_manager": "delta", "memory_budget": 480_000, "swap_dir": str(tmp_path / "swap")}
    cfg = {"model": "gpt2_tied", "fits": 2, "steps": 3, "strategy": strategy}
    check_script(SCRIPT, str(tmp_path), json.dumps(cfg), timeout=300)
    for rank in range(2):
        first, second = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)["fits"]
        assert len(first["losses"]) == 3 and first["losses"] == second["losses"], rank
        # the second strategy destroyed the first one's groups before making its own: the count stays
        assert first["live_groups"] == second["live_groups"] == first["live_groups_after"] > 1, (first, second)
        for fit in (first, second):
            assert fit["hooks_after"] == 0 and fit["delta_threads"] == [], fit
    assert (tmp_path / "swap").is_dir()  # made for DELTA's (unlinked) swap file


@pytest.mark.multiprocess
def test_tensor_parallel_fit_exits_cleanly_five_times(tmp_path):
    # Qwen2 at tp=2: sub-tensor all-reduces in flight at exit, or gloo threads outliving the interpreter, used to
    # abort about one exit in six ("terminate called without an active exception")
    cfg = {"model": "family:qwen2", "steps": 2, "strategy": {"tensor_parallel_size": 2}}
    for attempt in range(5):
        out = tmp_path / str(attempt)
        out.mkdir()
        result = run_script(SCRIPT, str(out), json.dumps(cfg), timeout=240)
        assert result.returncode == 0, (attempt, result.stdout[-4000:])
        assert "terminate called" not in result.stdout
        assert len(torch.load(out / "rank1.pt", weights_only=False)["fits"][0]["losses"]) == 2
