"""Two pipeline stages per rank (interleaved, V) under tensor parallelism: a block that the other local stage owns
runs as a stub, whose output torch's tensor-parallel hook must accept (it expects a DTensor)."""

from __future__ import annotations

import pytest

from tests.pipeline.test_pipeline_training import assert_matches, run_merak, run_reference


@pytest.mark.multiprocess
def test_interleaved_pp2_tp2_equals_one_process(tmp_path):
    ranks = run_merak(tmp_path, "llama", 4, {"pipeline_parallel_size": 2, "tensor_parallel_size": 2,
                                             "pipeline_schedule": "interleaved_1f1b", "recompute": "none"}, steps=2)
    assert_matches(ranks, run_reference("llama", steps=2))
