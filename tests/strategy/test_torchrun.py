"""MerakStrategy under an external launcher (torchrun): no subprocess launcher, same numerics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.launch import REPO, free_port
from tests.pipeline.test_pipeline_training import assert_matches, run_reference


@pytest.mark.multiprocess
def test_torchrun_data_parallel(tmp_path):
    cfg = {"model": "gpt2", "devices": 2, "steps": 3, "strategy": {}}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests/scripts/pipeline_fit.py"), str(tmp_path), json.dumps(cfg)]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ref = run_reference("gpt2", dp=2)
    losses = torch.tensor([r["losses"] for r in ranks]).mean(0)
    torch.testing.assert_close(losses, torch.tensor(ref["losses"]), atol=1e-5, rtol=0)
    for rank in ranks:
        rank["losses"] = ref["losses"]  # per-replica losses compared as their mean above
    assert_matches(ranks, ref)
