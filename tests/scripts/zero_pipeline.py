"""Several fits of a ``tests/helpers/pipeline_models`` module in one launch of CPU processes (the launch, not the
training, is what costs most at 8 processes), e.g. the same 3D layout at zero_stage 0 and 1.

usage: python tests/scripts/zero_pipeline.py OUT_DIR CONFIG_JSON
CONFIG_JSON: {"model": "gpt2", "devices": 8, "module": {...}, "trainer": {...}, "checkpoint_dir": null,
              "ckpt_path": null, "runs": {"zero0": {"strategy": {...MerakStrategy kwargs...}, "trainer": {...}}, ...}}
(a run's "trainer" entries override the common ones)
Each rank writes OUT_DIR/rank{r}.pt: {run: {"losses", "params" (full tensors), "state_bytes"}}.
"""

import datetime
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_merak import MerakStrategy  # noqa: E402
from lightning_merak.zero import optimizer_state_bytes  # noqa: E402
from tests.helpers.pipeline_models import make_module  # noqa: E402


class Losses(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def fit(cfg: dict, run: dict, root: Path) -> dict:
    module = make_module(cfg["model"], **cfg.get("module", {}))
    losses = Losses()
    callbacks: list[pl.Callback] = [losses]
    if cfg.get("checkpoint_dir"):
        callbacks.append(ModelCheckpoint(dirpath=cfg["checkpoint_dir"], save_top_k=-1, filename="{epoch}"))
    trainer = pl.Trainer(accelerator="cpu", devices=cfg["devices"], logger=False, enable_progress_bar=False,
                         strategy=MerakStrategy(timeout=datetime.timedelta(seconds=300), **run["strategy"]),
                         enable_checkpointing=len(callbacks) > 1, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=str(root),
                         **{**cfg.get("trainer", {}), **run.get("trainer", {})})
    trainer.fit(module, ckpt_path=cfg.get("ckpt_path"))
    state = optimizer_state_bytes(trainer.optimizers[0])
    # tensor-parallel shards are DTensors: gathered within the tp group, the same order on every rank
    params = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
              for k, v in module.state_dict().items()}
    return {"losses": losses.values, "params": params, "state_bytes": state}


if __name__ == "__main__":
    out, cfg = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    results = {name: fit(cfg, run, out / name) for name, run in cfg["runs"].items()}
    torch.save(results, out / f"rank{torch.distributed.get_rank()}.pt")
    # leave no gloo threads running at interpreter exit (an abort there would fail the launch after the results)
    torch.distributed.destroy_process_group()
