"""ZeRO-1 composed with pipeline and tensor parallelism: dp=2 x pp=2 x tp=2 (8 gloo processes) equals stage 0 and
one process with gradient accumulation and clipping; a 2x2x1 checkpoint resumes on 1x1x2."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.launch import REPO, check_script
from tests.pipeline.test_pipeline_training import run_reference

PIPELINE = {"pipeline_parallel_size": 2, "num_microbatches": 2, "pipeline_schedule": "1f1b", "recompute": "none"}


def _launch(out, devices: int, runs: dict, **cfg) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    check_script(REPO / "tests/scripts/zero_pipeline.py", str(out),
                 json.dumps({"model": "gpt2", "devices": devices, "runs": runs, **cfg}), timeout=900)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(devices)]


def _replica_losses(ranks: list[dict], run: str) -> torch.Tensor:
    """The global loss: the mean over the data-parallel replicas (ranks 0 and len/2 lead them)."""
    return torch.tensor([ranks[0][run]["losses"], ranks[len(ranks) // 2][run]["losses"]]).mean(0)


@pytest.mark.multiprocess
def test_3d_zero_1_equals_stage_0_and_one_process(tmp_path):
    three_d = {**PIPELINE, "tensor_parallel_size": 2}
    trainer = {"max_steps": 3, "gradient_clip_val": 0.3, "accumulate_grad_batches": 2}
    ranks = _launch(tmp_path, 8, {"zero0": {"strategy": three_d}, "zero1": {"strategy": {**three_d, "zero_stage": 1}}},
                    module={"n": 96, "momentum": 0.9}, trainer=trainer)
    torch.testing.assert_close(_replica_losses(ranks, "zero1"), _replica_losses(ranks, "zero0"), atol=1e-6, rtol=0)
    ref = run_reference("gpt2", steps=3, dp=2, module={"n": 96, "momentum": 0.9, "batch_size": 16}, accumulate=2,
                        clip=0.3)
    losses = _replica_losses(ranks, "zero1")
    per_step = losses.reshape(-1, 2).sum(1)  # Lightning reports each accumulated batch's loss / 2
    torch.testing.assert_close(per_step, torch.tensor(ref["losses"]), atol=1e-5, rtol=0)
    for rank in ranks:
        for key, value in rank["zero0"]["params"].items():
            torch.testing.assert_close(rank["zero1"]["params"][key], value, atol=1e-6, rtol=0, msg=key)
            torch.testing.assert_close(rank["zero1"]["params"][key], ref["params"][key], atol=1e-5, rtol=0, msg=key)
    for r in range(4):  # a (pp, tp) coordinate's two replicas share its momentum buffers, each holding one part
        pair = (ranks[r]["zero1"]["state_bytes"], ranks[r + 4]["zero1"]["state_bytes"])
        assert sum(pair) == ranks[r]["zero0"]["state_bytes"] and min(pair) > 0


@pytest.mark.multiprocess
def test_2x2x1_zero_checkpoint_resumes_on_1x1x2(tmp_path):
    module = {"n": 32, "momentum": 0.9}
    ckpt = tmp_path / "ckpt"
    full = _launch(tmp_path / "2x2x1", 4, {"zero1": {"strategy": {**PIPELINE, "zero_stage": 1}}}, module=module,
                   trainer={"max_epochs": 2}, checkpoint_dir=str(ckpt))
    resumed = _launch(tmp_path / "1x1x2", 2, {"tp2": {"strategy": {"tensor_parallel_size": 2}}},
                      module={**module, "batch_size": 16}, trainer={"max_epochs": 2},
                      ckpt_path=str(ckpt / "epoch=0.ckpt"))
    # two steps an epoch: the resumed run continues with the full run's second epoch
    torch.testing.assert_close(torch.tensor(resumed[0]["tp2"]["losses"]), _replica_losses(full, "zero1")[2:],
                               atol=1e-5, rtol=0)
    stages = {k: v for rank in full for k, v in rank["zero1"]["params"].items()}  # each pp rank holds its stage
    for key, value in resumed[0]["tp2"]["params"].items():
        torch.testing.assert_close(value, stages[key], atol=1e-5, rtol=0, msg=key)
