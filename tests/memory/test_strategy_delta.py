"""DELTA through MerakStrategy: one process and a 2-stage pipeline give the unmanaged run's numbers, and the
ledger's bytes are logged as metrics."""

from __future__ import annotations

import pytest
import torch

from tests.pipeline.test_pipeline_training import run_merak

PARAM_BYTES = 240_384  # the tiny GPT-2 (fp32)


@pytest.mark.multiprocess
@pytest.mark.parametrize(("devices", "pp", "budget"), [
    (1, 1, 2 * PARAM_BYTES + 400_000),  # the whole batch at once: its largest layer saves 265 kB
    (2, 2, 480_000),  # stage 0: 2 x 122 kB of parameters, activations must shrink; stage 1's minimum: 474 kB
])
def test_delta_through_the_strategy_equals_unmanaged(tmp_path, devices, pp, budget):
    """Tight budgets: DELTA must release activations on every stage."""
    base = {"pipeline_parallel_size": pp, "num_microbatches": 4 if pp > 1 else None, "recompute": "none",
            "pipeline_schedule": "1f1b"}
    plain = run_merak(tmp_path / "plain", "gpt2", devices, base, steps=4, module={"dropout": 0.1})
    managed = run_merak(tmp_path / "delta", "gpt2", devices,
                        {**base, "memory_manager": "delta", "memory_budget": budget}, steps=4,
                        module={"dropout": 0.1})
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
    output = (tmp_path / "delta" / "output.txt").read_text()
    assert "Merak + DELTA, first planned step per stage: stage 0 keeps" in output
    assert "DELTA memory ledger (rank 1, pipeline stage 1)" in output
