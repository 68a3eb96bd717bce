"""Fits under MerakStrategy on several CPU processes, with a failure injected on one rank, or several fits in a
row in one process; each rank saves what it saw.

usage: python tests/failures/fit.py OUT_DIR CONFIG_JSON
CONFIG_JSON: {"model": "sequential" | "gpt2" | ... | "family:qwen2" (tests/breadth/families.py), "devices": 2,
              "accelerator": "cpu" | "gpu",
              "steps": 4, "fits": 1, "strategy": {...}, "module": {...}, "timeout_s": 300,
              "fail": {"how": "raise_after_model" | "raise_before_model" | "sigkill", "rank": 1, "step": 2}}

``raise_after_model`` raises in the user's ``training_step`` after the model call: under a pipeline that code runs
on the last stage only, inside the schedule (its peers wait in a receive). ``raise_before_model`` raises before the
model call, which every rank runs (the first stage's capture): it is raised on ``rank`` only. ``sigkill`` kills
``rank`` with SIGKILL at the start of the step. Each rank writes ``rank{r}.pt`` at the end of every fit (losses per
fit, the process groups alive during and after each fit, hooks left on the module, DELTA's threads left running)
and ``fail_time`` just before the failure.
"""

import datetime
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_merak import MerakStrategy, topology  # noqa: E402
from tests.helpers.pipeline_models import make_module  # noqa: E402


class FamilyModule(pl.LightningModule):
    """``self.model(**batch).loss`` over a tiny model of tests/breadth/families.py, its batch repeated."""

    def __init__(self, name: str, n: int = 16) -> None:
        super().__init__()
        from tests.breadth.families import build

        self.model, batch = build(name)
        rows = [{k: v[i % len(v)] for k, v in batch.items()} for i in range(n)]
        self.rows = rows

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.rows, batch_size=4)


def build_module(name: str, kwargs: dict) -> pl.LightningModule:
    if name.startswith("family:"):
        pl.seed_everything(0, workers=False)
        return FamilyModule(name.split(":", 1)[1], **kwargs)
    return make_module(name, **kwargs)


def inject(module: pl.LightningModule, fail: dict, out: Path) -> None:
    """Wrap the module's step so that it fails as ``fail`` says, at step ``fail["step"]``."""
    step, how, rank = module.training_step, fail["how"], fail.get("rank")

    def now() -> bool:
        return module.trainer.global_step == fail["step"] and (rank is None or module.global_rank == rank)

    def mark() -> None:
        (out / "fail_time").write_text(str(time.time()))

    def failing_step(batch, batch_idx):
        if how == "sigkill" and now():
            # to the real stdout: a capture run of the step on the last stage has its prints silenced
            print(f"test: SIGKILL of rank {module.global_rank} at step {fail['step']}", file=sys.__stdout__, flush=True)
            mark()
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "raise_before_model" and now():
            mark()
            raise ValueError(f"user error before the model call on rank {module.global_rank} at step {fail['step']}")
        loss = step(batch, batch_idx)
        if how == "raise_after_model" and now():
            mark()
            raise ValueError(f"user error after the model call at step {fail['step']}")
        return loss

    module.training_step = failing_step


class Observe(pl.Callback):
    """Losses, and the process groups alive while training (to see that repeated fits do not accumulate them)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.live_groups = 0

    def on_train_start(self, trainer, pl_module):
        self.live_groups = topology.live_group_count()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


if __name__ == "__main__":
    out, cfg = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    fits = []
    for _ in range(cfg.get("fits", 1)):
        strategy = MerakStrategy(timeout=datetime.timedelta(seconds=cfg.get("timeout_s", 300)),
                                 **cfg.get("strategy", {}))
        observe = Observe()
        trainer = pl.Trainer(accelerator=cfg.get("accelerator", "cpu"), devices=cfg.get("devices", 2), strategy=strategy, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             max_steps=cfg.get("steps", 4), limit_val_batches=0, num_sanity_val_steps=0,
                             callbacks=[observe])
        module = build_module(cfg.get("model", "sequential"), cfg.get("module", {}))
        if "fail" in cfg:
            inject(module, cfg["fail"], out)
        trainer.fit(module)
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
        fits.append({"losses": observe.losses, "live_groups": observe.live_groups, "hooks_after": hooks,
                     "live_groups_after": topology.live_group_count(),
                     "delta_threads": [t.name for t in threading.enumerate() if t.name.startswith("delta-")]})
        torch.save({"fits": fits}, out / f"rank{trainer.global_rank}.pt")
