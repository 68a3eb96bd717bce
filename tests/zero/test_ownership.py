"""ZeRO's pure parts and options on one process: ownership by bytes, the bucket layout, the option checks."""

from __future__ import annotations

import random

import lightning.pytorch as pl
import pytest
import torch

from lightning_merak import MerakStrategy
from lightning_merak.config import MerakConfig, MerakConfigError
from lightning_merak.zero import ParameterOwnership, plan_buckets, weight_sized_states


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ownership_is_balanced_by_bytes_within_one_parameter(world):
    rng = random.Random(world)
    for _ in range(20):
        nbytes = [rng.choice([4, 64, 4096, 65536]) * rng.randint(1, 9) for _ in range(rng.randint(1, 40))]
        ownership = ParameterOwnership.balanced(nbytes, world)
        assert sorted(i for r in range(world) for i in ownership.owned(r)) == list(range(len(nbytes)))
        assert max(ownership.loads(nbytes)) <= sum(nbytes) / world + max(nbytes)
        assert ownership == ParameterOwnership.balanced(nbytes, world)  # every replica computes the same


def test_buckets_carry_each_parameter_once_from_its_owner():
    numels = [1000, 10, 10, 300, 5000, 7, 7, 7, 64]
    dtypes = [torch.float32] * 6 + [torch.bfloat16] * 3
    ownership = ParameterOwnership.balanced([n * 4 for n in numels], 2)
    indices = [i for i in range(len(numels)) if i != 2]  # a frozen parameter travels in no bucket
    buckets = plan_buckets(ownership, indices, numels, dtypes, bucket_bytes=2 * 4 * 600)
    carried = [(i, r) for b in buckets for r, members in enumerate(b.members) for i in members]
    assert sorted(i for i, _ in carried) == indices
    assert all(ownership.owners[i] == r for i, r in carried)
    for b in buckets:
        assert all(dtypes[i] == b.dtype for m in b.members for i in m)
        assert b.segment == max(sum(numels[i] for i in m) for m in b.members)
        for m in b.members:  # at most the cap per rank, unless one parameter alone is larger
            assert len(m) <= 1 or sum(numels[i] for i in m) <= 600
    assert len(buckets) > 2  # the cap split the float32 parameters


@pytest.mark.parametrize("bad", [3, -1, "1", True, 1.5, None])
def test_zero_stage_outside_0_to_2_fails_at_construction(bad):
    with pytest.raises(MerakConfigError, match="zero_stage="):
        MerakStrategy(zero_stage=bad)


def test_zero_stage_2_with_a_pipeline_is_refused():
    with pytest.raises(MerakConfigError, match="zero_stage=2 with pipeline_parallel_size=2"):
        MerakConfig(pipeline_parallel_size=2, zero_stage=2)
    MerakConfig(pipeline_parallel_size=2, zero_stage=1)


def test_zero_with_one_replica_warns_that_it_does_nothing():
    with pytest.warns(UserWarning, match="zero_stage=1 does nothing with data_parallel_size=1"):
        pl.Trainer(accelerator="cpu", devices=1, strategy=MerakStrategy(zero_stage=1), logger=False)


def test_weight_sized_states_are_measured_on_a_probe():
    """What the memory-aware partition counts per parameter, from the optimizer ``configure_optimizers`` made over
    meta weights (nothing stepped on them): the same class steps a CPU probe once."""
    meta = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    two_groups = torch.optim.SGD([{"params": meta[:1]}, {"params": [torch.nn.Parameter(torch.zeros(2, device="meta"))],
                                                          "momentum": 0.9}], lr=0.1)
    cases = [(torch.optim.SGD(meta, lr=0.1), 0), (torch.optim.SGD(meta, lr=0.1, momentum=0.9), 1),
             (torch.optim.AdamW(meta), 2), (torch.optim.Adam(meta, amsgrad=True), 3), (torch.optim.Adagrad(meta), 1),
             (two_groups, 1)]
    for optimizer, copies in cases:
        before = {id(p): dict(st) for p, st in optimizer.state.items()}  # Adagrad makes its state at construction
        assert weight_sized_states(optimizer) == copies, type(optimizer).__name__
        assert {id(p): dict(st) for p, st in optimizer.state.items()} == before  # the user's one untouched

    class Opaque(torch.optim.Optimizer):  # a constructor the probe cannot call: unknown, not guessed
        def __init__(self, params, scale):
            super().__init__(params, {"lr": 0.1})

    assert weight_sized_states(Opaque(meta, scale=2)) is None
