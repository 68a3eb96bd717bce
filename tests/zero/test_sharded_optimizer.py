"""``ShardedOptimizer`` on 2 gloo processes without Lightning: a branch only one replica takes, the state each rank
keeps and writes, and the optimizers it refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers.launch import spawn


def _model() -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict({"trunk": nn.Linear(8, 8), "head": nn.Linear(8, 1), "branch": nn.Linear(8, 1)})


def _loss(model: nn.ModuleDict, x: torch.Tensor, take_branch: bool) -> torch.Tensor:
    h = torch.tanh(model["trunk"](x))
    out = model["head"](h) + (model["branch"](h) if take_branch else 0)
    return out.pow(2).mean()


def _worker(rank: int, world: int, stage: int, one_sided: bool) -> dict:
    import torch.distributed as dist

    from lightning_merak.config import MerakConfigError
    from lightning_merak.zero import ShardedOptimizer

    batches = [torch.randn(4, 8, generator=torch.Generator().manual_seed(s)) for s in range(2 * world)]
    model, reference = _model(), _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.1)
    sharded = ShardedOptimizer(opt, stage, dist.group.WORLD)
    for step in range(2):
        opt.zero_grad()
        _loss(model, batches[2 * step + rank], take_branch=rank == 0 or not one_sided).backward()
        sharded.sync_gradients(list(model.parameters()))
        opt.step()
        sharded.after_step()
        ref_opt.zero_grad()  # one process, both replicas' samples: the mean of their losses
        sum(_loss(reference, batches[2 * step + r], take_branch=r == 0 or not one_sided)
            for r in range(world)).div(world).backward()
        ref_opt.step()
    with pytest.raises(MerakConfigError, match="LBFGS"):
        ShardedOptimizer(torch.optim.LBFGS(model.parameters()), stage, dist.group.WORLD)
    written = {i for i, s in opt.state_dict()["state"].items() if s}
    return {"params": {k: v.detach() for k, v in model.state_dict().items()},
            "reference": {k: v.detach() for k, v in reference.state_dict().items()},
            "written": written, "owned": set(sharded.ownership.owned(rank)), "kept": len(opt.state)}


# one_sided: rank 1 never takes the branch, so its gradient exists on one replica only (stage 2 reduces it as
# zero there; stage 1's all-reduce is topology.allreduce_grads, whose handling of that case is its own)
CASES = [(1, False), (2, True)]


def _cases(rank: int, world: int) -> dict:
    return {case: _worker(rank, world, *case) for case in CASES}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    """Both cases in one 2-process launch."""
    return spawn(_cases, 2)


@pytest.mark.multiprocess
@pytest.mark.parametrize(("stage", "one_sided"), CASES)
def test_sharded_optimizer_equals_one_process_and_keeps_only_owned_state(ranks, stage, one_sided):
    results = [r[(stage, one_sided)] for r in ranks]
    for res in results:
        for key, value in res["reference"].items():
            torch.testing.assert_close(res["params"][key], value, atol=1e-6, rtol=0, msg=key)
        assert res["written"] == res["owned"] and res["kept"] == len(res["owned"])
    assert results[0]["owned"] | results[1]["owned"] == set(range(6)) and not results[0]["owned"] & results[1]["owned"]
