"""Full 3D parallelism (dp=2 x pp=2 x tp=2 on 8 processes) equals one process; its checkpoint resumes on other
layouts (1x1x1, 1x2x1) and, consolidated, in a plain one-process script.

The runs share their launches with ``tests/zero/test_zero_3d.py`` (``tests/helpers/three_d.py``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers.launch import REPO
from tests.pipeline.test_pipeline_training import run_reference

ATOL = 1e-5


def _global_losses(ranks: list[dict], dp: int) -> torch.Tensor:
    per_replica = len(ranks) // dp
    return torch.tensor([ranks[d * per_replica]["losses"] for d in range(dp)]).mean(0)


@pytest.mark.multiprocess
def test_3d_gpt2_equals_one_process(three_d):
    ranks = three_d["gpt2_3d"]
    ref = run_reference("gpt2", steps=4, dp=2, module={"n": 32})
    full = _global_losses(ranks, dp=2)
    torch.testing.assert_close(full, torch.tensor(ref["losses"]), atol=ATOL, rtol=0)
    for rank in ranks:
        for key, value in rank["params"].items():
            torch.testing.assert_close(value, ref["params"][key], atol=ATOL, rtol=0, msg=key)


@pytest.mark.multiprocess
def test_3d_checkpoint_resumes_on_pp2(three_d):
    full = _global_losses(three_d["gpt2_3d"], dp=2)
    # the first epoch's checkpoint resumed on pp=2 alone
    torch.testing.assert_close(torch.tensor(three_d["resume_pp2"][0]["losses"]), full[2:], atol=ATOL, rtol=0)


@pytest.mark.multiprocess
def test_3d_checkpoint_resumes_on_one_process_and_in_a_plain_script(three_d, tmp_path):
    full = _global_losses(three_d["gpt2_3d"], dp=2)
    # the first epoch's checkpoint resumed on one process
    torch.testing.assert_close(torch.tensor(three_d["resume_one"][0]["losses"]), full[2:], atol=ATOL, rtol=0)

    # consolidated into one ordinary Lightning checkpoint, resumed in a plain script without MerakStrategy
    from lightning_merak import cli

    first_epoch = str(three_d.folder("eight") / "ckpt" / "epoch=0.ckpt")
    merged = tmp_path / "merged.ckpt"
    assert cli.main(["consolidate", first_epoch, str(merged)]) == 0
    script = f"""
import sys, torch, lightning.pytorch as pl
sys.path.insert(0, {str(REPO)!r})
from tests.helpers.models import reference_loader
from tests.helpers.pipeline_models import DictData, HFModule
module = HFModule.load_from_checkpoint({str(merged)!r})
assert module.hparams.name == "gpt2"
losses = []
class Rec(pl.Callback):
    def on_train_batch_end(self, trainer, m, out, b, i):
        losses.append(float(out["loss"]))
module = HFModule(name="gpt2", n=32, batch_size=16)
# the order the 3D run's data-parallel sampler drew samples in (DESIGN.md, Testing)
module.train_dataloader = lambda: reference_loader(DictData("causal", 32, seed=0), 16)
trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, limit_val_batches=0, callbacks=[Rec()])
trainer.fit(module, ckpt_path={str(merged)!r})
torch.save(losses, {str(tmp_path / "plain.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=300, capture_output=True)
    torch.testing.assert_close(torch.tensor(torch.load(tmp_path / "plain.pt")), full[2:], atol=ATOL, rtol=0)


@pytest.mark.multiprocess
def test_3d_llama_equals_one_process(three_d):
    ranks = three_d["llama_3d"]
    ref = run_reference("llama", steps=3, dp=2)
    torch.testing.assert_close(_global_losses(ranks, 2), torch.tensor(ref["losses"]), atol=ATOL, rtol=0)
    for rank in ranks:
        for key, value in rank["params"].items():
            torch.testing.assert_close(value, ref["params"][key], atol=ATOL, rtol=0, msg=key)


@pytest.mark.multiprocess
def test_tp2_optimizer_state_resumes_on_one_process(three_d):
    """SGD momentum of per-head-sharded (fused q|k|v) parameters survives a tp=2 -> tp=1 resume."""
    full, resumed = three_d["tp2"], three_d["tp1_resume"]
    torch.testing.assert_close(torch.tensor(resumed[0]["losses"]), torch.tensor(full[0]["losses"][2:]),
                               atol=ATOL, rtol=0)
    for key, value in resumed[0]["params"].items():
        torch.testing.assert_close(value, full[0]["params"][key], atol=ATOL, rtol=0, msg=key)
