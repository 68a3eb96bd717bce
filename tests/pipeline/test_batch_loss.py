"""A loss that couples the samples of a batch is exact under a pipeline (issue 12, item 3): the last stage computes
it once over every micro-batch (``batch_loss``), detected on the first step."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_merak import MerakConfigError, MerakStrategy
from lightning_merak.pipeline.plan.schedules import SCHEDULES, forwards_first, make_schedule, validate
from lightning_merak.pipeline.takeover import LossProbe, PipelineInputError, merge_dims
from tests.pipeline.test_pipeline_training import assert_matches, run_merak, run_reference

STEPS = 4


def _probe_line(tmp_path) -> tuple[float, float]:
    text = (tmp_path / "output.txt").read_text()
    match = re.search(r"couples the batch \(first step: whole-batch loss ([\d.e+-]+), mean of the micro-batch "
                      r"losses ([\d.e+-]+)\)", text)
    assert match, text[-3000:]
    return float(match[1]), float(match[2])


@pytest.mark.multiprocess
def test_in_batch_negatives_at_pp2_equal_one_process(tmp_path):
    """Contrastive loss over the whole batch (each sample against every target): by default "auto" finds that the
    whole-batch loss differs from the mean of micro-batch losses and computes it over the whole batch."""
    ranks = run_merak(tmp_path, "contrastive", 2, {"pipeline_parallel_size": 2, "num_microbatches": 4},
                      steps=STEPS)
    ref = run_reference("contrastive", steps=STEPS)
    assert_matches(ranks, ref)
    whole, micro = _probe_line(tmp_path)
    assert whole == pytest.approx(ref["losses"][0], abs=1e-5)
    assert abs(whole - micro) > 0.05 * whole  # per micro-batch it would be a different loss, not rounding


@pytest.mark.multiprocess
def test_padded_labels_token_mean_at_pp2_zbv_equals_one_process(tmp_path):
    """HF's loss is a mean over the batch's real tokens (labels -100 past each sample's length): the last stage
    runs over the whole batch, so the mean is over all of them. Under ZB-V (two stages per rank, split backward),
    where the last stage lives on rank 0 beside the first."""
    module = {"variable_length": "padded"}
    ranks = run_merak(tmp_path, "gpt2", 2, {"pipeline_parallel_size": 2, "num_microbatches": 4,
                                            "pipeline_schedule": "zbv", "recompute": "none"},
                      steps=STEPS, module=module)
    assert_matches(ranks, run_reference("gpt2", steps=STEPS, module=module))
    _probe_line(tmp_path)


def test_forwards_first_keeps_every_schedule_valid_and_the_last_stage_whole():
    for name in SCHEDULES:
        for p, m in ((2, 4), (4, 8)):
            try:
                base = make_schedule(name, p, m)
            except Exception:  # the schedule's own micro-batch rules
                continue
            ordered = forwards_first(base)
            validate(ordered)
            last = ordered.num_stages - 1
            for actions in ordered.actions:
                kinds = [a.kind for a in actions]
                assert "F" not in kinds[kinds.index(next(k for k in kinds if k != "F")):]  # all F first
                assert not any(a.stage == last and a.kind in "IW" for a in actions)
            assert sorted(a for r in ordered.actions for a in r if a.kind == "F") == \
                sorted(a for r in base.actions for a in r if a.kind == "F")


def test_merge_dims_finds_the_batch_dimension_or_says_why_not():
    meta = lambda *shape: torch.empty(shape, device="meta")  # noqa: E731
    micro = [(meta(2, 8, 32), meta(1, 2, 8, 8), meta(16, 2))] * 4
    assert merge_dims((micro, (meta(8, 8, 32), meta(1, 2, 8, 8), meta(16, 8)))) == [0, None, 1]
    uneven = [(meta(n, 32),) for n in (9, 12, 10, 13)]  # graphs: node counts differ per micro-batch
    assert merge_dims((uneven, (meta(44, 32),))) == [0]
    with pytest.raises(PipelineInputError, match=r"batch_loss='microbatch'"):
        merge_dims(([(meta(2, 8),)] * 4, (meta(8, 9),)))
    with pytest.raises(PipelineInputError, match="cannot be concatenated"):
        merge_dims(([(meta(2, 8),)] * 4, (meta(6, 8),)))


def test_the_probe_tells_rounding_from_coupling():
    probe = LossProbe(lambda: None, 2, [0])
    probe.whole_loss, probe.micro_loss = 2.0, 2.0 * (1 + 1e-7)
    assert not probe.couples
    probe.micro_loss = 2.01
    assert probe.couples
    probe.draws = True  # the step draws random numbers itself: no verdict
    assert not probe.couples


def test_batch_loss_option_is_checked():
    with pytest.raises(MerakConfigError, match="batch_loss='exact' is unknown"):
        MerakStrategy(batch_loss="exact")
    assert MerakStrategy(batch_loss="whole").config.batch_loss == "whole"
