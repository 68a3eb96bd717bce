"""Train a test module under MerakStrategy on several CPU processes; each rank saves what it holds.

usage: python tests/scripts/pipeline_fit.py OUT_DIR CONFIG_JSON
CONFIG_JSON, one run: {"model": "gpt2", "devices": 2, "steps": 3, "strategy": {...MerakStrategy kwargs...},
              "module": {...module kwargs...}, "trainer": {...Trainer kwargs...}, "predict": false,
              "callbacks": {"ModelCheckpoint": {...}, "EarlyStopping": {...}}, "ckpt_path": null,
              "init_module": false (build the module under trainer.init_module(empty_init=True))}
  Each rank writes OUT_DIR/rank{r}.pt.
CONFIG_JSON, several runs in one launch (start-up of the processes costs more than these fits):
  {"devices": 2, "runs": {"NAME": {...one run's keys but "devices"...}, ...}}
  One after another; run NAME writes OUT_DIR/NAME/rank{r}.pt and OUT_DIR/NAME/output.rank{r}.txt (what the
  rank printed during that run, also echoed to the launch's output).
"""

import contextlib
import datetime
import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch import callbacks as pl_callbacks

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_merak import MerakStrategy  # noqa: E402
from lightning_merak.zero import optimizer_state_bytes  # noqa: E402
from tests.helpers.models import RecordLoss  # noqa: E402
from tests.helpers.pipeline_models import make_module  # noqa: E402


def make_trainer(cfg: dict, devices: int) -> tuple[pl.Trainer, RecordLoss, list]:
    strategy = MerakStrategy(timeout=datetime.timedelta(seconds=90), **cfg.get("strategy", {}))
    rec = RecordLoss()
    trainer_kwargs = dict(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          max_steps=cfg.get("steps", 3), limit_val_batches=0, num_sanity_val_steps=0, callbacks=[rec])
    trainer_kwargs.update(cfg.get("trainer", {}))
    extra = [getattr(pl_callbacks, name)(**kwargs) for name, kwargs in cfg.get("callbacks", {}).items()]
    trainer_kwargs["callbacks"] = [rec, *extra]
    if extra and "enable_checkpointing" not in cfg.get("trainer", {}):
        trainer_kwargs["enable_checkpointing"] = any(isinstance(c, pl_callbacks.ModelCheckpoint) for c in extra)
    return pl.Trainer(**trainer_kwargs), rec, extra


def fit(trainer: pl.Trainer, rec: RecordLoss, extra: list, cfg: dict) -> dict:
    if cfg.get("init_module"):
        with trainer.init_module(empty_init=True):
            module = make_module(cfg["model"], **cfg.get("module", {}))
        assert all(p.is_meta for p in module.parameters())
    else:
        module = make_module(cfg["model"], **cfg.get("module", {}))
    trainer.fit(module, ckpt_path=cfg.get("ckpt_path"))
    local = [p.to_local() if hasattr(p, "to_local") else p for p in module.parameters()]
    # tensor-parallel shards are DTensors: gather them (collective within the tp group, same order everywhere)
    params = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
              for k, v in module.state_dict().items()}
    result = {"losses": rec.losses, "params": params,
              "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
              "progress_bar_metrics": {k: float(v) for k, v in trainer.progress_bar_metrics.items()},
              "global_step": trainer.global_step, "current_epoch": trainer.current_epoch,
              "local_param_bytes": sum(p.numel() * p.element_size() for p in local),
              "local_param_names": sorted(n for n, _ in module.named_parameters()),
              "meta_tensors": sum(t.is_meta for t in [*module.parameters(), *module.buffers()]),
              "noise_sums": getattr(module, "noise_sums", None),
              "counters": {k: getattr(module, k, None) for k in ("calls", "after")},
              "state_bytes": optimizer_state_bytes(trainer.optimizers[0]) if trainer.optimizers else None}
    for cb in extra:
        if isinstance(cb, pl_callbacks.EarlyStopping):
            result["stopped_epoch"] = cb.stopped_epoch
        if isinstance(cb, pl_callbacks.ModelCheckpoint):
            result["best_model_path"] = cb.best_model_path
    if cfg.get("predict"):
        result["predictions"] = torch.cat(trainer.predict(module))
        result["validate"] = trainer.validate(module, verbose=False)[0]
    return result


@contextlib.contextmanager
def captured(path: Path):
    """This rank's stdout and stderr, at the file descriptors (so every writer's), into ``path``; then echoed."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "w") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        sys.stdout.write(path.read_text())
        sys.stdout.flush()


def fit_many(out: Path, cfg: dict) -> None:
    devices = cfg["devices"]
    for index, (name, run) in enumerate(cfg["runs"].items()):
        trainer, rec, extra = make_trainer(run, devices)
        if index == 0 and trainer.strategy.launcher is not None:
            # Lightning starts the other ranks now, before any output is captured: they must not inherit the
            # first run's capture file as their stdout
            trainer.strategy.launcher.launch(lambda: None)
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
        (out / name).mkdir(parents=True, exist_ok=True)
        with captured(out / name / f"output.rank{rank}.txt"):
            result = fit(trainer, rec, extra, run)
        torch.save(result, out / name / f"rank{trainer.global_rank}.pt")
    # leave no gloo threads running at interpreter exit (an abort there would fail the launch after the results)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    out, cfg = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    if "runs" in cfg:
        fit_many(out, cfg)
    else:
        trainer, rec, extra = make_trainer(cfg, cfg.get("devices", 2))
        result = fit(trainer, rec, extra, cfg)
        torch.save(result, out / f"rank{trainer.global_rank}.pt")
