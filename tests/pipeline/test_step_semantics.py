"""What the user's step does around the model call keeps its meaning under a pipeline (issue 12)."""

from __future__ import annotations

import pytest
import torch

from tests.pipeline.test_pipeline_training import run_merak, run_reference

STEPS = 150


@pytest.mark.multiprocess
@pytest.mark.parametrize("pp", [2, 4])
def test_noise_drawn_in_the_step_is_the_same_on_every_stage_and_the_denoiser_learns(tmp_path, pp):
    """``noise = randn_like(x); loss = mse(net(x + noise), noise)``: the first stage draws the noise it corrupts the
    input with, the last stage the noise it uses as the target. They must be the same numbers, per micro-batch."""
    m = 4
    ranks = run_merak(tmp_path, "denoiser", pp, {"pipeline_parallel_size": pp, "pipeline_schedule": "1f1b",
                                                 "recompute": "none", "num_microbatches": m}, steps=STEPS)
    # before them: the setup's capture, and the first step's test of whether the loss couples the batch (whose
    # verdict here is "the step draws random numbers itself": one loss per micro-batch)
    first, last = ranks[0]["noise_sums"][-STEPS * m:], ranks[pp - 1]["noise_sums"][-STEPS * 2 * m:]
    # the first stage runs the step up to the model call once per micro-batch; the last: a (quiet) capture per
    # micro-batch for the shapes, then the step as the loss
    assert len(ranks[0]["noise_sums"]) == 1 + (1 + 1) + STEPS * m  # setup, probe (whole, first micro-batch), steps
    assert "training_step draws random numbers itself" in (tmp_path / "output.txt").read_text()
    for step in range(STEPS):
        captured = first[step * m:(step + 1) * m]
        as_loss = last[step * 2 * m + m:(step + 1) * 2 * m]
        assert captured == as_loss, (step, captured, as_loss)
    ref = run_reference("denoiser", steps=STEPS)["losses"]
    tail, ref_tail = sum(ranks[0]["losses"][-10:]) / 10, sum(ref[-10:]) / 10
    assert tail == pytest.approx(ref_tail, rel=0.15), (tail, ref_tail)


def test_manual_optimization_under_a_pipeline_is_refused_before_any_work():
    import lightning.pytorch as pl

    from lightning_merak import MerakConfigError
    from lightning_merak.parallelize import check_step_supported

    class Manual(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(MerakConfigError, match="manual optimization .* pipeline_parallel_size > 1"):
        check_step_supported(Manual(), pp=2)
    check_step_supported(Manual(), pp=1)  # fine without a pipeline


@pytest.mark.multiprocess
def test_effects_of_the_step_happen_once_per_micro_batch(tmp_path):
    """A counter on ``self`` and a print before the model call, a counter after it, ``self.log``: each happens once
    per micro-batch on each rank, as the user wrote it. The captures of the model's inputs on the rank with the
    last stage, the setup's capture and the first step's probe of the loss are quiet (attributes put back, prints
    silenced, logs ignored)."""
    m, steps = 4, 3
    ranks = run_merak(tmp_path, "counting", 2, {"pipeline_parallel_size": 2, "num_microbatches": m,
                                                "pipeline_schedule": "1f1b"}, steps=steps)
    first, last = ranks[0]["counters"], ranks[1]["counters"]
    assert first == {"calls": m * steps, "after": 0}  # the first stage's part of the step ends at the model call
    assert last == {"calls": m * steps, "after": m * steps}
    printed = (tmp_path / "output.txt").read_text().count("STEP-PRINT")
    assert printed == 2 * m * steps  # once per micro-batch on each of the two ranks
    ref = run_reference("counting", steps=steps)
    torch.testing.assert_close(torch.tensor(ranks[1]["losses"]), torch.tensor(ref["losses"]), atol=1e-5, rtol=0)
