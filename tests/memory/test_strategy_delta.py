"""DELTA through MerakStrategy: one process and a 2-stage pipeline give the unmanaged run's numbers, and the
ledger's bytes are logged as metrics."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.pipeline_runs import Launches

PARAM_BYTES = 240_384  # the tiny GPT-2 (fp32)
LAYOUTS = [
    (1, 1, 2 * PARAM_BYTES + 400_000),  # the whole batch at once: its largest layer saves 265 kB
    (2, 2, 480_000),  # stage 0: 2 x 122 kB of parameters, activations must shrink; stage 1's minimum: 474 kB
]


def _runs(pp: int, budget: int) -> dict[str, dict]:
    """The unmanaged run and the managed one, in one launch."""
    base = {"pipeline_parallel_size": pp, "num_microbatches": 4 if pp > 1 else None, "recompute": "none",
            "pipeline_schedule": "1f1b"}
    run = {"model": "gpt2", "steps": 4, "module": {"dropout": 0.1}}
    return {f"plain-{pp}": {**run, "strategy": base},
            f"delta-{pp}": {**run, "strategy": {**base, "memory_manager": "delta", "memory_budget": budget}}}


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Launches:
    groups = {f"pp{pp}": (devices, lambda root, pp=pp, budget=budget: _runs(pp, budget), ())
              for devices, pp, budget in LAYOUTS}
    return Launches(tmp_path_factory.mktemp("strategy_delta"), groups)


@pytest.mark.multiprocess
@pytest.mark.parametrize(("devices", "pp", "budget"), LAYOUTS)
def test_delta_through_the_strategy_equals_unmanaged(launched, devices, pp, budget):
    """Tight budgets: DELTA must release activations on every stage."""
    plain, managed = launched[f"plain-{pp}"], launched[f"delta-{pp}"]
    assert len(plain) == len(managed) == devices
    for a, b in zip(plain, managed, strict=True):
        assert a["losses"] == b["losses"]
        for key, value in a["params"].items():
            assert torch.equal(value, b["params"][key]), key
    metrics = managed[0]["callback_metrics"]
    if pp == 1:
        assert 0 < metrics["delta/peak_bytes"] <= metrics["delta/allowance_bytes"] < 410_000
        assert metrics["delta/swapped_bytes"] + metrics["delta/recomputed_bytes"] > 0
        return
    # each stage's DELTA has its own ledger, all logged by rank 0, each peak within its stage's allowance, and
    # the first stage (two forwards in flight under 1F1B) releases more than the last (one)
    for stage in range(pp):
        assert 0 < metrics[f"delta/peak_bytes/stage{stage}"] <= metrics[f"delta/allowance_bytes/stage{stage}"]
    released = [metrics[f"delta/swapped_bytes/stage{s}"] + metrics[f"delta/recomputed_bytes/stage{s}"]
                for s in range(pp)]
    assert released[0] > released[1]
    output = launched.output(f"delta-{pp}")
    assert "Merak + DELTA, first planned step per stage: stage 0 keeps" in output
    assert "DELTA memory ledger (rank 1, pipeline stage 1)" in output
