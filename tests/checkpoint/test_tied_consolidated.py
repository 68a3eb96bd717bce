"""A weight tied across pipeline stages (GPT-2's wte = lm_head at pp=2) in a checkpoint: its optimizer state is
stored once, under the name one process gives it, so the consolidated file resumes in a plain one-process script
and, through MerakStrategy, at pp=2 again, both continuing with the uninterrupted pp=2 run's losses (issue 12)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers.launch import REPO
from tests.helpers.pipeline_models import make_module
from tests.pipeline.test_pipeline_training import run_merak

ATOL = 1e-5
PP2 = {"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b", "num_microbatches": 4, "recompute": "none"}
# momentum: the resumed losses depend on the optimizer state; 16 samples, batch 8: two steps an epoch
MODULE = {"n": 16, "momentum": 0.9}


@pytest.mark.multiprocess
def test_tied_weight_state_appears_once_and_the_consolidated_file_resumes(tmp_path):
    ckpt = tmp_path / "ckpt"
    full = run_merak(tmp_path / "pp2", "gpt2_tied", 2, PP2, steps=-1, module=MODULE,
                     trainer={"max_epochs": 2, "limit_val_batches": 0},
                     callbacks={"ModelCheckpoint": {"dirpath": str(ckpt), "save_top_k": -1, "filename": "{epoch}"}})
    losses = torch.tensor(full[0]["losses"])
    assert len(losses) == 4
    assert "tied: transformer.wte.weight = lm_head.weight on stages [0, 1]" in (tmp_path / "pp2" / "output.txt").read_text()

    merged = tmp_path / "merged.ckpt"
    subprocess.run([sys.executable, "-m", "lightning_merak.cli", "consolidate", str(ckpt / "epoch=0.ckpt"),
                    str(merged)], check=True, cwd=REPO, timeout=120)
    plain = torch.load(merged, weights_only=False)
    one_process = [n for n, _ in make_module("gpt2_tied", **MODULE).named_parameters()]
    assert "model.lm_head.weight" not in one_process  # one parameter, named by its first user
    assert plain["merak_param_order"] == one_process
    state = plain["optimizer_states"][0]["state"]
    assert sorted(state) == list(range(len(one_process)))
    assert float(state[0]["momentum_buffer"].abs().sum()) > 0  # the tied weight's momentum is in there

    script = f"""
import sys, torch, lightning.pytorch as pl
sys.path.insert(0, {str(REPO)!r})
from tests.helpers.models import reference_loader
from tests.helpers.pipeline_models import DictData, make_module
losses = []
class Rec(pl.Callback):
    def on_train_batch_end(self, trainer, m, out, b, i):
        losses.append(float(out["loss"]))
module = make_module("gpt2_tied", **{MODULE!r})
module.train_dataloader = lambda: reference_loader(DictData("causal", 16, seed=0), 8)
trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, limit_val_batches=0, callbacks=[Rec()])
trainer.fit(module, ckpt_path={str(merged)!r})
torch.save(losses, {str(tmp_path / "plain.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=300, capture_output=True)
    torch.testing.assert_close(torch.tensor(torch.load(tmp_path / "plain.pt")), losses[2:], atol=ATOL, rtol=0)

    # back through MerakStrategy: at pp=2 from the consolidated file (the lm_head copy takes wte's state), and on
    # one process from the sharded folder
    for devices, strategy, path in ((2, PP2, merged), (1, {"recompute": "none"}, ckpt / "epoch=0.ckpt")):
        resumed = run_merak(tmp_path / f"resume{devices}", "gpt2_tied", devices, strategy, steps=-1, module=MODULE,
                            trainer={"max_epochs": 2, "limit_val_batches": 0}, ckpt_path=str(path))
        for rank in resumed:
            torch.testing.assert_close(torch.tensor(rank["losses"]), losses[2:], atol=ATOL, rtol=0)
            for key, value in rank["params"].items():
                torch.testing.assert_close(value, full[0 if key in full[0]["params"] else 1]["params"][key],
                                           atol=ATOL, rtol=0, msg=key)
