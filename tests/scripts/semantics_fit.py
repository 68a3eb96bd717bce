"""Run a module of ``tests/pipeline/semantics_models.py`` under MerakStrategy on several CPU processes; each rank
saves what it holds and what its hooks saw.

usage: python tests/scripts/semantics_fit.py OUT_DIR CONFIG_JSON
CONFIG_JSON: {"model": "two_tower", "devices": 2, "strategy": {...MerakStrategy kwargs...}, "module": {...},
              "steps": 3 (fit that many steps; 0: no fit), "evaluate": false (validate, test and predict),
              "predict": false (predict only)}
"""

import datetime
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_merak import MerakStrategy  # noqa: E402
from tests.helpers.models import RecordLoss  # noqa: E402
from tests.pipeline.semantics_models import make  # noqa: E402

if __name__ == "__main__":
    out, cfg = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    strategy = MerakStrategy(timeout=datetime.timedelta(seconds=90), **cfg.get("strategy", {}))
    rec = RecordLoss()
    trainer = pl.Trainer(accelerator="cpu", devices=cfg["devices"], strategy=strategy, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         max_steps=cfg.get("steps", 0) or -1, limit_val_batches=1.0 if cfg.get("evaluate") else 0,
                         num_sanity_val_steps=0, callbacks=[rec])
    module = make(cfg["model"], **cfg.get("module", {}))
    result = {}
    if cfg.get("steps", 0):
        trainer.fit(module)
        result["losses"] = rec.losses
        result["params"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if cfg.get("evaluate"):
        result["validate"] = trainer.validate(module, verbose=False)[0]
        result["test"] = trainer.test(module, verbose=False)[0]
        result["reduced"] = module.reduced
    if cfg.get("evaluate") or cfg.get("predict"):
        result["predictions"] = torch.cat(trainer.predict(module))
    torch.save(result, out / f"rank{trainer.global_rank}.pt")
