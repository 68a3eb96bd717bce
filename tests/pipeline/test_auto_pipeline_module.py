"""``pipeline_module="auto"`` does not leave most of a model replicated (issue 12): where no child holds most of
the parameters (two towers of about half each), the LightningModule itself is pipelined when the step calls
``self(...)``, and the printed plan shows each stage's share and what stays outside the pipeline."""

from __future__ import annotations

import re

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_merak.parallelize import find_pipelined_module, first_step_call, parameter_shares
from lightning_merak.partition import plan_model
from tests.helpers.models import reference_loader
from tests.pipeline.semantics_models import PairData, TwoTower, make
from tests.pipeline.test_eval_side_effects import run_semantics

ATOL = 1e-5


class DirectTowers(TwoTower):
    """The step calls the towers itself, not through ``self(...)``."""

    def training_step(self, batch, batch_idx):
        s, t, y = batch
        return (nn.functional.cosine_similarity(self.structure(s), self.proj(self.text(t))) - y).pow(2).mean()


def test_auto_choice():
    batch = next(iter(torch.utils.data.DataLoader(PairData(8), batch_size=8)))
    towers = make("two_tower")
    shares = {name: sum(p.numel() for p in c.parameters()) for name, c in towers.named_children()}
    total = sum(shares.values())
    assert max(shares.values()) < total / 2  # the towers 49 % and 47 %, the projection 4 %
    calls = first_step_call(towers, batch, "training_step", 2)
    assert find_pipelined_module(towers, "auto", calls) == ("", towers)
    assert find_pipelined_module(towers, "auto") == ("structure", towers.structure)  # no pipeline: as before
    assert find_pipelined_module(towers, "text", calls) == ("text", towers.text)  # named: as asked

    direct = DirectTowers()
    with pytest.warns(UserWarning, match=r"the largest, `structure`, holds 4\d%.*does not call self\(\.\.\.\)"):
        assert find_pipelined_module(direct, "auto", first_step_call(direct, batch, "training_step", 2))[0] == \
            "structure"

    class Wrapped(pl.LightningModule):  # one child holds everything: that child, whatever the step does
        def __init__(self):
            super().__init__()
            self.model, self.scale = TwoTower(), nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            return self.model.training_step(batch, batch_idx)

    wrapped = Wrapped()
    assert find_pipelined_module(wrapped, "auto", first_step_call(wrapped, batch, "training_step", 2))[0] == "model"


def test_plan_reports_stage_shares_and_what_is_replicated():
    towers = make("two_tower")
    example = (torch.randn(4, 16), torch.randn(4, 12)), {}
    whole = parameter_shares(towers, towers, plan_model(towers, example, 2))
    shares = [float(s) for s in re.findall(r"stage \d ([\d.]+)%", whole)]
    assert len(shares) == 2 and sum(shares) == pytest.approx(100, abs=0.2) and min(shares) > 40, whole
    assert "outside the pipeline: 0 (0.0%)" in whole
    one = parameter_shares(towers, towers.structure, plan_model(towers.structure, ((torch.randn(4, 16),), {}), 2))
    assert re.search(r"outside the pipeline: 3,328 \(51\.1%\) \(`text` 3,056, `proj` 272\)", one), one


@pytest.mark.multiprocess
def test_two_tower_pipelined_whole_equals_one_process(tmp_path):
    steps = 6
    ranks = run_semantics(tmp_path, "two_tower", 2, {"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b",
                                                     "num_microbatches": 4, "recompute": "none"}, steps=steps,
                          predict=True)
    output = (tmp_path / "output.txt").read_text()
    assert "Merak partition of the LightningModule itself (TwoTower) into 2 stages" in output
    shares = re.search(r"parameters per stage, of the model's [\d,]+: stage 0 ([\d.]+)%, stage 1 ([\d.]+)%; "
                       r"replicated on every pipeline rank, outside the pipeline: 0 \(0\.0%\)", output)
    assert shares and min(float(shares[1]), float(shares[2])) > 40, output[-3000:]

    ref = make("two_tower")
    ref.train_dataloader = lambda: reference_loader(PairData(ref.hparams.n), ref.hparams.batch_size)
    losses = []

    class Rec(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[Rec()])
    trainer.fit(ref)
    predictions = torch.cat(trainer.predict(ref))
    assert losses[0] - losses[-1] > 20 * ATOL  # it trains: the comparison is not of constants
    seen = set()
    for rank in ranks:
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(losses), atol=ATOL, rtol=0)
        for key, value in rank["params"].items():
            torch.testing.assert_close(value, ref.state_dict()[key], atol=ATOL, rtol=0, msg=key)
            seen.add(key)
    assert seen == set(ref.state_dict())  # every weight is on a stage: nothing was left replicated
    assert not set(ranks[0]["params"]) & set(ranks[1]["params"])
    for rank in ranks:  # predict through the whole pipelined LightningModule, on every rank
        torch.testing.assert_close(rank["predictions"], predictions, atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_stages", [2, 4])
def test_a_tensor_only_returned_crosses_to_the_last_stage(num_stages):
    """The structure tower's embedding is never read by a later block, only returned: it is sent on (through the
    text tower's stages at 4) to the last stage, which returns it. Stages run in one process equal the whole."""
    import copy

    from lightning_merak.pipeline.stage import build_stages

    towers = make("two_tower")
    g = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(4, 16, generator=g), torch.randn(4, 12, generator=g), torch.rand(4, generator=g)
    plan = plan_model(towers, ((s, t), {}), num_stages)
    assert any(b.via.startswith("output of") for st in plan.stages for b in st.boundary), plan.table()

    def loss_of(a, b):
        return (nn.functional.cosine_similarity(a, b) - y).pow(2).mean()

    ref_loss = loss_of(*towers(s, t))
    ref_loss.backward()
    stages = [build_stages(copy.deepcopy(towers), plan, [i])[0] for i in range(num_stages)]
    received, inputs, outputs = (), [], []
    for stage in stages:
        received = tuple(r.detach().requires_grad_() for r in received)
        out = stage(*received, model_args=(s, t), model_kwargs={})
        inputs.append(received)
        outputs.append(out)
        received = out
    loss = loss_of(*outputs[-1])
    loss.backward()
    for i in range(num_stages - 2, -1, -1):
        torch.autograd.backward(outputs[i], tuple(r.grad for r in inputs[i + 1]))
    assert torch.equal(loss, ref_loss)
    grads = {k: p.grad for stage in stages for k, p in stage.module.named_parameters()}
    assert set(grads) == {k for k, _ in towers.named_parameters()}
    for key, p in towers.named_parameters():
        torch.testing.assert_close(grads[key], p.grad, atol=1e-7, rtol=0, msg=key)
