"""Train torch_geometric test modules under MerakStrategy, several runs in one launch; each rank saves per run
what it holds.

usage: python tests/scripts/graph_fit.py OUT_DIR CONFIG_JSON
CONFIG_JSON: {"devices": 2, "runs": [{"name": "pp2", "model": "rgcn", "steps": 3, "strategy": {...},
              "module": {...}, "expect_error": false}, ...]}
A run with "expect_error" must raise at its first step; its message is saved and nothing after it runs (Lightning
ends the other ranks on an error).
"""

import datetime
import json
import sys
import traceback
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_merak import MerakStrategy  # noqa: E402
from tests.graph.models import make_module  # noqa: E402
from tests.scripts.pipeline_fit import RecordLoss  # noqa: E402


def fit(out: Path, devices: int, run: dict) -> None:
    module = make_module(run["model"], **run.get("module", {}))
    rec = RecordLoss()
    trainer = pl.Trainer(accelerator="cpu", devices=devices, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, max_steps=run.get("steps", 3),
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[rec],
                         strategy=MerakStrategy(timeout=datetime.timedelta(seconds=90), **run.get("strategy", {})))
    if run.get("expect_error"):
        try:
            trainer.fit(module)
        except Exception:  # noqa: BLE001 - the traceback is what the test checks
            (out / f"{run['name']}.rank{trainer.global_rank}.error.txt").write_text(traceback.format_exc())
            return
        raise SystemExit(f"run {run['name']} was expected to fail")
    trainer.fit(module)
    result = {"losses": rec.losses,
              "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
              "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}
    torch.save(result, out / f"{run['name']}.rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    out, cfg = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    for run in cfg["runs"]:
        fit(out, cfg["devices"], run)
