"""Bad input fails at Trainer construction, in the launching process, before any process or work starts."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from lightning_merak import MerakConfigError, MerakStrategy
from lightning_merak.config import parse_bytes


def _trainer(strategy, **kwargs):
    return pl.Trainer(strategy=strategy, accelerator="cpu", logger=False, **kwargs)


def test_world_not_divisible_by_pp_times_tp():
    with pytest.raises(MerakConfigError, match=r"world size 3 is not divisible by .* 2 x 1 = 2"):
        _trainer(MerakStrategy(pipeline_parallel_size=2), devices=3)


def test_explicit_dp_size_mismatch():
    with pytest.raises(MerakConfigError, match=r"data_parallel_size=4 .* does not equal the world size 2"):
        _trainer(MerakStrategy(data_parallel_size=4), devices=2)


@pytest.mark.parametrize("option", ["pipeline_parallel_size", "tensor_parallel_size", "data_parallel_size",
                                    "subtensor_chunks", "num_microbatches"])
@pytest.mark.parametrize("value", [0, -1])
def test_sizes_below_one(option, value):
    with pytest.raises(MerakConfigError, match=f"{option}={value} is invalid"):
        MerakStrategy(**{option: value})


@pytest.mark.parametrize(("option", "value", "message"), [
    ("pipeline_schedule", "zb", "pipeline_schedule='zb' is unknown"),
    ("recompute", "some", "recompute='some' is unknown"),
    ("recompute", 1.5, "must lie in"),
    ("memory_manager", "dtr", "memory_manager='dtr' is unknown"),
    ("partition", 3, "partition=3 is invalid"),
])
def test_unknown_options(option, value, message):
    with pytest.raises(MerakConfigError, match=message):
        MerakStrategy(**{option: value})


@pytest.mark.parametrize("precision", ["64-true", "16-true"])
def test_unsupported_precision(precision):
    with pytest.raises(MerakConfigError, match=f"precision='{precision}' is not supported"):
        _trainer(MerakStrategy(), devices=1, precision=precision)


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_multiprocessing_launcher_refused_with_reason(method):
    with pytest.raises(MerakConfigError, match="holds only its own stage/shard"):
        MerakStrategy(start_method=method)


def test_budget_parsing_and_budget_without_manager():
    assert parse_bytes("20GiB") == 20 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes(1024) == 1024
    with pytest.raises(MerakConfigError, match="cannot be parsed as a size"):
        MerakStrategy(memory_manager="delta", memory_budget="lots")
    with pytest.raises(MerakConfigError, match="nothing uses it"):
        MerakStrategy(memory_budget="1GiB", recompute="none")
    with pytest.raises(MerakConfigError, match="nothing uses it"):
        MerakStrategy(memory_budget="1GiB")  # stage-aware recompute needs a pipeline to use a budget


def test_partition_list_length_checked():
    with pytest.raises(MerakConfigError, match="needs 3"):
        MerakStrategy(pipeline_parallel_size=4, partition=["a", "b"])


@pytest.mark.parametrize(("schedule", "pp", "m", "rule"), [
    ("shifted_critical_path", 2, 3, "needs num_microbatches >= 4"),
    ("shifted_critical_path", 8, 6, r"needs num_microbatches >= 4 and >= the 8 pipeline stages"),
    ("interleaved_1f1b", 4, 9, "multiple of the number of rounds"),
    ("zbv", 4, 3, r"zbv needs num_microbatches >= pp \(4\)"),
])
def test_schedule_micro_batch_rules_checked_at_construction(schedule, pp, m, rule):
    with pytest.raises(MerakConfigError, match=rf"pipeline_schedule='{schedule}' cannot run num_microbatches={m}.*{rule}"):
        MerakStrategy(pipeline_parallel_size=pp, num_microbatches=m, pipeline_schedule=schedule)
    MerakStrategy(pipeline_parallel_size=pp, num_microbatches=m, pipeline_schedule="auto")  # auto skips them


def test_delta_with_two_stages_per_rank_refused():
    with pytest.raises(MerakConfigError, match="memory_manager='delta' with pipeline_schedule='zbv' is not supported"):
        MerakStrategy(pipeline_parallel_size=2, pipeline_schedule="zbv", memory_manager="delta", memory_budget="1GiB")


def test_partition_list_counts_two_stages_per_rank():
    with pytest.raises(MerakConfigError, match=r"pipeline_schedule='zbv' makes 4 stages, so it needs 3"):
        MerakStrategy(pipeline_parallel_size=2, pipeline_schedule="zbv", num_microbatches=4, partition=["h.2"])
    MerakStrategy(pipeline_parallel_size=2, pipeline_schedule="zbv", num_microbatches=4, partition=["h.1", "h.2", "h.3"])


def test_too_few_blocks_for_two_stages_per_rank():
    import torch
    from torch import nn

    from lightning_merak.parallelize import plan_stages

    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(MerakConfigError, match="two stages on each pipeline rank, so Sequential must be cut into 8"):
        plan_stages(model, ((torch.randn(2, 4),), {}), (0, 1, 2, 3, 3, 2, 1, 0), "auto")
