"""Checkpoints under MerakStrategy (dp=2) when a save fails midway and when files are replaced by payloads.

usage: python tests/scripts/checkpoint_faults.py OUT_DIR
Runs, in one launch: an uninterrupted fit; a fit whose re-save of last.ckpt fails on rank 1 in the middle of
the DCP write; a resume from last.ckpt; loads of copies of last.ckpt with one (or every) non-shard file
replaced by a pickle that would create OUT_DIR/pwned. Each rank writes OUT_DIR/rank{r}.pt.
"""

import datetime
import shutil
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.checkpoint import FileSystemWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_merak import MerakStrategy  # noqa: E402
from lightning_merak import checkpoint as ckpt  # noqa: E402
from tests.checkpoint.payload import non_shard_files, poison  # noqa: E402
from tests.helpers.models import RegressionModule  # noqa: E402

FAULT = {"last_saves": 0, "armed": False}


def _count_saves(save_sharded):
    def wrapped(path, *args, **kwargs):
        if path.name == "last.ckpt":
            FAULT["last_saves"] += 1
        return save_sharded(path, *args, **kwargs)
    return wrapped


def _failing_write(write_data):
    """Rank 1 writes its shard, then fails before DCP's metadata and Merak's meta.pt / marker are written."""
    def wrapped(self, plan, planner):
        future = write_data(self, plan, planner)
        if FAULT["armed"] and FAULT["last_saves"] == 2 and dist.get_rank() == 1:
            raise OSError("injected fault: rank 1's file system failed in the middle of the checkpoint write")
        return future
    return wrapped


ckpt.save_sharded = _count_saves(ckpt.save_sharded)
FileSystemWriter.write_data = _failing_write(FileSystemWriter.write_data)


class NotedModule(RegressionModule):
    """Adds its own entries to the checkpoint (``on_save_checkpoint``) and records what comes back."""

    def on_save_checkpoint(self, checkpoint):
        checkpoint["user_note"] = {"step": self.global_step, "text": "kept", "tensor": torch.arange(3) * self.global_step}

    def on_load_checkpoint(self, checkpoint):
        self.loaded_note = checkpoint.get("user_note")


def module():
    pl.seed_everything(0, workers=False)
    return NotedModule(hidden=8, depth=3, batch_size=4, n=32)


def trainer(root, epochs, callbacks=()):
    strategy = MerakStrategy(timeout=datetime.timedelta(seconds=60))
    return pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, max_epochs=epochs,
                      limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
                      default_root_dir=str(root))


def attempt(fn):
    try:
        fn()
    except BaseException as err:  # DCP's CheckpointException is a BaseException
        return f"{type(err).__name__}: {err}"
    return None


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    ckpts = out / "ckpts"
    full = module()
    trainer(out / "full", 2).fit(full)

    part = module()
    FAULT["armed"] = True
    fault = attempt(lambda: trainer(out / "part", 2, [ModelCheckpoint(dirpath=ckpts, save_last=True)]).fit(part))
    FAULT["armed"] = False
    rank = dist.get_rank()
    after_fault = sorted(p.name for p in ckpts.iterdir())
    pristine = out / "pristine.ckpt"
    if rank == 0:
        shutil.copytree(ckpts / "last.ckpt", pristine)
    dist.barrier()

    resumed = module()
    trainer(out / "resumed", 2, [ModelCheckpoint(dirpath=ckpts, save_last=True)]).fit(resumed, ckpt_path="last")
    after_resume = sorted(p.name for p in ckpts.iterdir())

    files = [p.name for p in non_shard_files(pristine)]
    poisoned = {}
    for name in [*files, "*"]:
        copy = out / f"poisoned-{name.strip('.') if name != '*' else 'all'}.ckpt"
        if rank == 0:
            shutil.copytree(pristine, copy)
            for target in files if name == "*" else [name]:
                poison(copy / target, out / "pwned")
        dist.barrier()
        poisoned[name] = (str(copy), attempt(lambda copy=copy: trainer(out / "poisoned", 2).fit(module(), ckpt_path=copy)))
    dist.barrier()
    torch.save({"full_losses": full.step_losses, "part_losses": part.step_losses, "fault": fault,
                "resumed_losses": resumed.step_losses, "loaded_note": resumed.loaded_note,
                "after_fault": after_fault, "after_resume": after_resume, "poisoned": poisoned,
                "pristine_files": files}, out / f"rank{rank}.pt")
