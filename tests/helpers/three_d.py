"""The runs of ``tests/pipeline/test_3d.py`` and ``tests/zero/test_zero_3d.py``, shared by both (the ``three_d``
fixture in ``tests/conftest.py``): one launch per process count. dp=2 x pp=2 x tp=2 (8 processes) with and
without ZeRO-1, a 2x2x1 ZeRO checkpoint, and the resumes of these checkpoints on other layouts."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.pipeline_runs import Group

PIPELINE = {"pipeline_parallel_size": 2, "num_microbatches": 2, "pipeline_schedule": "1f1b", "recompute": "none"}
THREE_D = {**PIPELINE, "tensor_parallel_size": 2}
TWO_EPOCHS = {"max_epochs": 2, "limit_val_batches": 0}


def _checkpoints(folder: Path, **kwargs) -> dict:
    return {"ModelCheckpoint": {"dirpath": str(folder), "save_top_k": -1, "filename": "{epoch}", **kwargs}}


def _eight(root: Path) -> dict[str, dict]:
    zero = {"model": "gpt2", "steps": 3, "module": {"n": 96, "momentum": 0.9},
            "trainer": {"gradient_clip_val": 0.3, "accumulate_grad_batches": 2}}
    return {
        # n=32 samples, global batch 16: two steps an epoch; a checkpoint at each epoch end
        "gpt2_3d": {"model": "gpt2", "strategy": THREE_D, "steps": 4, "module": {"n": 32}, "trainer": TWO_EPOCHS,
                    "callbacks": _checkpoints(root / "eight" / "ckpt", every_n_epochs=1)},
        "llama_3d": {"model": "llama", "strategy": THREE_D, "steps": 3},
        "zero0": {**zero, "strategy": THREE_D},
        "zero1": {**zero, "strategy": {**THREE_D, "zero_stage": 1}},
    }


def _four(root: Path) -> dict[str, dict]:
    return {"zero_2x2x1": {"model": "gpt2", "strategy": {**PIPELINE, "zero_stage": 1}, "steps": -1,
                           "module": {"n": 32, "momentum": 0.9}, "trainer": TWO_EPOCHS,
                           "callbacks": _checkpoints(root / "four" / "ckpt")}}


def _two(root: Path) -> dict[str, dict]:
    module = {"n": 32, "momentum": 0.9, "batch_size": 16}
    return {
        # the 3D run's first epoch on pp=2 alone (batch 16 = the 3D run's global batch)
        "resume_pp2": {"model": "gpt2", "steps": -1, "module": {"n": 32, "batch_size": 16}, "trainer": TWO_EPOCHS,
                       "strategy": {"pipeline_parallel_size": 2, "num_microbatches": 4, "pipeline_schedule": "gpipe",
                                    "recompute": "none"}, "ckpt_path": str(root / "eight" / "ckpt" / "epoch=0.ckpt")},
        "tp2": {"model": "gpt2", "strategy": {"tensor_parallel_size": 2}, "steps": -1, "module": module,
                "trainer": TWO_EPOCHS, "callbacks": _checkpoints(root / "two" / "ckpt")},
        "zero_resume_tp2": {"model": "gpt2", "strategy": {"tensor_parallel_size": 2}, "steps": -1, "module": module,
                            "trainer": TWO_EPOCHS, "ckpt_path": str(root / "four" / "ckpt" / "epoch=0.ckpt")},
    }


def _one(root: Path) -> dict[str, dict]:
    return {
        "resume_one": {"model": "gpt2", "strategy": {"recompute": "none"}, "steps": -1,
                       "module": {"n": 32, "batch_size": 16}, "trainer": TWO_EPOCHS,
                       "ckpt_path": str(root / "eight" / "ckpt" / "epoch=0.ckpt")},
        "tp1_resume": {"model": "gpt2", "strategy": {}, "steps": -1, "trainer": TWO_EPOCHS,
                       "module": {"n": 32, "momentum": 0.9, "batch_size": 16},
                       "ckpt_path": str(root / "two" / "ckpt" / "epoch=0.ckpt")},
    }


GROUPS: dict[str, Group] = {"eight": (8, _eight, ()), "four": (4, _four, ()), "two": (2, _two, ("eight", "four")),
                            "one": (1, _one, ("eight", "two"))}
