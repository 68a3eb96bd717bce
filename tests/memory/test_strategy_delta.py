"""DELTA through MerakStrategy: one process and a 2-stage pipeline give the unmanaged run's numbers, and the
ledger's bytes are logged as metrics."""

from __future__ import annotations

import pytest
import torch

from tests.pipeline.test_pipeline_training import run_merak

BUDGET = 2 * 4 * 250_000 + 2**20  # 2 x parameter bytes of the tiny GPT-2 (~1 MB) + 1 MiB of activations


@pytest.mark.multiprocess
@pytest.mark.parametrize(("devices", "pp"), [(1, 1), (2, 2)])
def test_delta_through_the_strategy_equals_unmanaged(tmp_path, devices, pp):
    base = {"pipeline_parallel_size": pp, "num_microbatches": 4 if pp > 1 else None, "recompute": "none",
            "pipeline_schedule": "1f1b"}
    plain = run_merak(tmp_path / "plain", "gpt2", devices, base, steps=4, module={"dropout": 0.1})
    managed = run_merak(tmp_path / "delta", "gpt2", devices,
                        {**base, "memory_manager": "delta", "memory_budget": BUDGET}, steps=4,
                        module={"dropout": 0.1})
    for a, b in zip(plain, managed, strict=True):
        assert a["losses"] == b["losses"]
        for key, value in a["params"].items():
            assert torch.equal(value, b["params"][key]), key
    metrics = managed[0]["callback_metrics"]
    assert metrics["delta/peak_bytes"] > 0 and metrics["delta/peak_bytes"] <= BUDGET
