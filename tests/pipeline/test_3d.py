"""Full 3D parallelism (dp=2 x pp=2 x tp=2 on 8 processes) equals one process; its checkpoint resumes on other
layouts (1x1x1, 1x2x1) and, consolidated, in a plain one-process script."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers.launch import REPO
from tests.pipeline.test_pipeline_training import run_merak, run_reference

ATOL = 1e-5
THREE_D = {"pipeline_parallel_size": 2, "tensor_parallel_size": 2, "num_microbatches": 2,
           "pipeline_schedule": "1f1b", "recompute": "none"}


def _global_losses(ranks: list[dict], dp: int) -> torch.Tensor:
    per_replica = len(ranks) // dp
    return torch.tensor([ranks[d * per_replica]["losses"] for d in range(dp)]).mean(0)


@pytest.mark.multiprocess
def test_3d_gpt2_equals_one_process_and_resumes_on_other_layouts(tmp_path):
    ckpt = tmp_path / "ckpt"
    # n=32 samples, global batch 16: two steps an epoch; a checkpoint at each epoch end
    ranks = run_merak(tmp_path / "3d", "gpt2", 8, THREE_D, steps=4, module={"n": 32},
                      trainer={"max_epochs": 2, "limit_val_batches": 0},
                      callbacks={"ModelCheckpoint": {"dirpath": str(ckpt), "save_top_k": -1,
                                                     "filename": "{epoch}", "every_n_epochs": 1}})
    ref = run_reference("gpt2", steps=4, dp=2, module={"n": 32})
    full = _global_losses(ranks, dp=2)
    torch.testing.assert_close(full, torch.tensor(ref["losses"]), atol=ATOL, rtol=0)
    for rank in ranks:
        for key, value in rank["params"].items():
            torch.testing.assert_close(value, ref["params"][key], atol=ATOL, rtol=0, msg=key)

    first_epoch = str(ckpt / "epoch=0.ckpt")
    # resume on one process (batch 16 = the 3D run's global batch), then on pp=2 alone
    for devices, strategy in ((1, {"recompute": "none"}), (2, {"pipeline_parallel_size": 2, "num_microbatches": 4,
                                                              "pipeline_schedule": "gpipe", "recompute": "none"})):
        resumed = run_merak(tmp_path / f"resume{devices}", "gpt2", devices, strategy, steps=-1,
                            module={"n": 32, "batch_size": 16}, trainer={"max_epochs": 2, "limit_val_batches": 0},
                            ckpt_path=first_epoch)
        torch.testing.assert_close(torch.tensor(resumed[0]["losses"]), full[2:], atol=ATOL, rtol=0)

    # consolidated into one ordinary Lightning checkpoint, resumed in a plain script without MerakStrategy
    merged = tmp_path / "merged.ckpt"
    subprocess.run([sys.executable, "-m", "lightning_merak.cli", "consolidate", first_epoch, str(merged)],
                   check=True, cwd=REPO, timeout=120)
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
def test_3d_llama_equals_one_process(tmp_path):
    ranks = run_merak(tmp_path, "llama", 8, THREE_D, steps=3)
    ref = run_reference("llama", steps=3, dp=2)
    torch.testing.assert_close(_global_losses(ranks, 2), torch.tensor(ref["losses"]), atol=ATOL, rtol=0)
    for rank in ranks:
        for key, value in rank["params"].items():
            torch.testing.assert_close(value, ref["params"][key], atol=ATOL, rtol=0, msg=key)


@pytest.mark.multiprocess
def test_tp2_optimizer_state_resumes_on_one_process(tmp_path):
    """SGD momentum of per-head-sharded (fused q|k|v) parameters survives a tp=2 -> tp=1 resume."""
    module = {"n": 32, "momentum": 0.9, "batch_size": 16}
    ckpt = tmp_path / "ckpt"
    full = run_merak(tmp_path / "tp2", "gpt2", 2, {"tensor_parallel_size": 2}, steps=-1, module=module,
                     trainer={"max_epochs": 2, "limit_val_batches": 0},
                     callbacks={"ModelCheckpoint": {"dirpath": str(ckpt), "save_top_k": -1, "filename": "{epoch}"}})
    resumed = run_merak(tmp_path / "tp1", "gpt2", 1, {}, steps=-1, module=module,
                        trainer={"max_epochs": 2, "limit_val_batches": 0}, ckpt_path=str(ckpt / "epoch=0.ckpt"))
    torch.testing.assert_close(torch.tensor(resumed[0]["losses"]), torch.tensor(full[0]["losses"][2:]),
                               atol=ATOL, rtol=0)
    for key, value in resumed[0]["params"].items():
        torch.testing.assert_close(value, full[0]["params"][key], atol=ATOL, rtol=0, msg=key)
