"""Train a test module under MerakStrategy on several CPU processes; each rank saves what it holds.

usage: python tests/scripts/pipeline_fit.py OUT_DIR CONFIG_JSON
CONFIG_JSON: {"model": "gpt2", "devices": 2, "steps": 3, "strategy": {...MerakStrategy kwargs...},
              "module": {...module kwargs...}, "trainer": {...Trainer kwargs...}, "predict": false}
"""

import datetime
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_merak import MerakStrategy  # noqa: E402
from tests.helpers.pipeline_models import make_module  # noqa: E402


class RecordLoss(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


if __name__ == "__main__":
    out, cfg = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    module = make_module(cfg["model"], **cfg.get("module", {}))
    strategy = MerakStrategy(timeout=datetime.timedelta(seconds=90), **cfg.get("strategy", {}))
    rec = RecordLoss()
    trainer_kwargs = dict(accelerator="cpu", devices=cfg.get("devices", 2), strategy=strategy, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          max_steps=cfg.get("steps", 3), limit_val_batches=0, num_sanity_val_steps=0, callbacks=[rec])
    trainer_kwargs.update(cfg.get("trainer", {}))
    trainer = pl.Trainer(**trainer_kwargs)
    trainer.fit(module)
    result = {"losses": rec.losses, "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
              "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}
    if cfg.get("predict"):
        result["predictions"] = torch.cat(trainer.predict(module))
        result["validate"] = trainer.validate(module, verbose=False)[0]
    torch.save(result, out / f"rank{trainer.global_rank}.pt")
