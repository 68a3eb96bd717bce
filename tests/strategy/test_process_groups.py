"""The strategy's process groups on 4 gloo processes (a dp=2 x pp=2 mesh), in one launch.

- Data-parallel replicas whose batches reach different parameters (a branch only some batches take) reduce the
  same buckets in the same order, and train exactly like one process over the union of the batches.
- The mesh's subgroups carry the strategy's timeout: a pipeline-group collective with one rank absent fails
  after it, not after torch's default of 30 minutes.
"""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from lightning_merak import topology
from tests.helpers.launch import spawn

SUBGROUP_TIMEOUT = timedelta(seconds=3)


class Branchy(nn.Module):
    """``extra`` is used only by batches that ask for it; ``never`` by none (a frozen-in-practice head)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 8)
        self.extra = nn.Linear(8, 8)  # between used parameters, so a skipped one would shift the bucket
        self.never = nn.Linear(8, 8)
        self.last = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, use_extra: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        h = torch.where(use_extra[:, None], h + self.extra(h), h)
        return self.last(h)

    def forward_rank(self, x: torch.Tensor, takes_branch: bool) -> torch.Tensor:
        """What a rank whose whole batch does (not) take the branch runs: ``extra`` is not called at all."""
        h = torch.tanh(self.first(x))
        if takes_branch:
            h = h + self.extra(h)
        return self.last(h)


# per step, which rank's batch takes the branch: rank 0 only; neither; rank 1 only
BRANCH = [(True, False), (False, False), (False, True)]


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(3, 4, generator=g), torch.randn(3, 1, generator=g)


def _train_both(grp: dist.ProcessGroup, rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = Branchy()
    reference = copy.deepcopy(model)  # one process, both ranks' samples in one batch
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.1)
    grads_none = []
    for step, takes in enumerate(BRANCH):
        x, y = _batch(step, rank)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model.forward_rank(x, takes[rank]), y).backward()
        topology.allreduce_grads([p for p in model.parameters()], grp, world, bucket_bytes=64)  # several buckets
        grads_none.append({n for n, p in model.named_parameters() if p.grad is None})
        opt.step()

        xs, ys = zip(*[_batch(step, r) for r in range(world)], strict=True)
        use = torch.tensor([takes[r] for r in range(world) for _ in range(3)])
        ref_opt.zero_grad(set_to_none=True)
        if use.any():
            out = reference(torch.cat(xs), use)
        else:  # as the ranks do: the branch is not called at all, its gradient stays None
            out = reference.forward_rank(torch.cat(xs), False)
        nn.functional.mse_loss(out, torch.cat(ys)).backward()
        ref_opt.step()
    with torch.no_grad():
        diff = max(float((a - b).abs().max()) for a, b in zip(model.parameters(), reference.parameters(), strict=True))
    return {"diff": diff, "grads_none": grads_none, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def _worker(rank: int, world: int) -> dict:
    mesh = topology.build_mesh("cpu", 2, 2, 1, timeout=SUBGROUP_TIMEOUT)
    torch_mesh = init_device_mesh("cpu", (2, 2, 1), mesh_dim_names=topology.MESH_DIMS)
    layout = {dim: [(dist.get_process_group_ranks(m[dim].get_group()), m[dim].get_local_rank(), m[dim].size())
                    for m in (mesh, torch_mesh)] for dim in topology.MESH_DIMS}
    training = _train_both(topology.group(mesh, "dp"), topology.local_rank(mesh, "dp"), topology.size(mesh, "dp"))
    error = None
    if rank == 0:  # its pipeline peer, rank 1, never joins
        try:
            dist.all_reduce(torch.ones(1), group=topology.group(mesh, "pp"))
        except RuntimeError as err:
            error = str(err)
    dist.barrier()  # rank 1 stays alive here (60 s default group) until rank 0's collective gave up
    return {"training": training, "layout": layout, "error": error}


@pytest.fixture(scope="module")
def ranks():
    # the error names the 3 s subgroup timeout; the hard limit (imports included) is far below torch's 30 min
    return spawn(_worker, 4, timeout=240)


@pytest.mark.multiprocess
def test_branch_taken_by_some_replicas_only_matches_one_process(ranks):
    for res in ranks:
        res = res["training"]
        assert res["diff"] < 1e-6
        never = {"never.weight", "never.bias"}
        # extra: a gradient on one replica is a gradient (the average) on both; unused on both: None on both
        assert res["grads_none"] == [never, never | {"extra.weight", "extra.bias"}, never]
    for a, b in ((0, 2), (1, 3)):  # the replicas of each dp group stay identical
        for name, value in ranks[a]["training"]["params"].items():
            torch.testing.assert_close(ranks[b]["training"]["params"][name], value, atol=0, rtol=0)


@pytest.mark.multiprocess
def test_mesh_equals_torchs_and_its_subgroups_time_out_with_the_strategy(ranks):
    for res in ranks:  # same groups, coordinates and sizes as init_device_mesh
        for dim, (ours, torchs) in res["layout"].items():
            assert ours == torchs, dim
    assert ranks[0]["layout"]["pp"][0][0] == [0, 1] and ranks[0]["layout"]["dp"][0][0] == [0, 2]
    assert "Timed out" in ranks[0]["error"] and f"{int(SUBGROUP_TIMEOUT.total_seconds() * 1000)}ms" in ranks[0]["error"]
    assert all(res["error"] is None for res in ranks[1:])
