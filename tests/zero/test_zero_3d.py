"""ZeRO-1 composed with pipeline and tensor parallelism: dp=2 x pp=2 x tp=2 (8 gloo processes) equals stage 0 and
one process with gradient accumulation and clipping; a 2x2x1 checkpoint resumes on 1x1x2.

The runs share their launches with ``tests/pipeline/test_3d.py`` (``tests/helpers/three_d.py``)."""

from __future__ import annotations

import pytest
import torch

from tests.pipeline.test_pipeline_training import run_reference


def _replica_losses(ranks: list[dict]) -> torch.Tensor:
    """The global loss: the mean over the data-parallel replicas (ranks 0 and len/2 lead them)."""
    return torch.tensor([ranks[0]["losses"], ranks[len(ranks) // 2]["losses"]]).mean(0)


@pytest.mark.multiprocess
def test_3d_zero_1_equals_stage_0_and_one_process(three_d):
    zero0, zero1 = three_d["zero0"], three_d["zero1"]
    torch.testing.assert_close(_replica_losses(zero1), _replica_losses(zero0), atol=1e-6, rtol=0)
    ref = run_reference("gpt2", steps=3, dp=2, module={"n": 96, "momentum": 0.9, "batch_size": 16}, accumulate=2,
                        clip=0.3)
    losses = _replica_losses(zero1)
    per_step = losses.reshape(-1, 2).sum(1)  # Lightning reports each accumulated batch's loss / 2
    torch.testing.assert_close(per_step, torch.tensor(ref["losses"]), atol=1e-5, rtol=0)
    for stage0, stage1 in zip(zero0, zero1, strict=True):
        for key, value in stage0["params"].items():
            torch.testing.assert_close(stage1["params"][key], value, atol=1e-6, rtol=0, msg=key)
            torch.testing.assert_close(stage1["params"][key], ref["params"][key], atol=1e-5, rtol=0, msg=key)
    for r in range(4):  # a (pp, tp) coordinate's two replicas share its momentum buffers, each holding one part
        pair = (zero1[r]["state_bytes"], zero1[r + 4]["state_bytes"])
        assert sum(pair) == zero0[r]["state_bytes"] and min(pair) > 0


@pytest.mark.multiprocess
def test_2x2x1_zero_checkpoint_resumes_on_1x1x2(three_d):
    full, resumed = three_d["zero_2x2x1"], three_d["zero_resume_tp2"]
    # two steps an epoch: the resumed run continues with the full run's second epoch
    torch.testing.assert_close(torch.tensor(resumed[0]["losses"]), _replica_losses(full)[2:], atol=1e-5, rtol=0)
    stages = {k: v for rank in full for k, v in rank["params"].items()}  # each pp rank holds its stage
    for key, value in resumed[0]["params"].items():
        torch.testing.assert_close(value, stages[key], atol=1e-5, rtol=0, msg=key)
