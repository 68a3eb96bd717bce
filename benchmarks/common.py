"""Shared by the benchmarks: train the example GPT-2 under a given strategy in a fresh launch and report
tokens/s of the global batch after warm-up steps. Each measurement is its own launch (Lightning's subprocess
launcher starts the other ranks), so benchmarks can alternate configurations and report ratios.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
WARMUP = 3


def worker(spec: dict) -> None:
    """Run inside the launched process: ``spec`` = {strategy, devices, steps, model, data}."""
    import lightning.pytorch as pl
    import torch

    sys.path.insert(0, str(REPO / "examples"))
    from gpt2_pretrain import GPT2Pretrain, TextDataModule

    torch.set_num_threads(1)
    pl.seed_everything(0)
    if spec["strategy"] == "ddp":
        strategy = "ddp"
    else:
        from lightning_merak import MerakStrategy

        strategy = MerakStrategy(**spec["strategy"])
    model = GPT2Pretrain(**spec["model"])
    data = TextDataModule(**spec["data"])
    steps = spec["steps"]

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == WARMUP:
                self.start = time.perf_counter()

        def on_train_end(self, trainer, *args):
            if trainer.is_global_zero:
                elapsed = time.perf_counter() - self.start
                replicas = trainer.strategy.distributed_sampler_kwargs["num_replicas"]
                tokens = (steps - WARMUP) * spec["data"]["batch_size"] * spec["data"]["seq_len"] * replicas
                print(f"RESULT {tokens / elapsed:.1f} {elapsed / (steps - WARMUP):.4f}", flush=True)

    trainer = pl.Trainer(accelerator="cpu", devices=spec["devices"], strategy=strategy, max_steps=steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[Timer()])
    trainer.fit(model, datamodule=data)


class Run(NamedTuple):
    """One launch: tokens/s and seconds per step after the warm-up, and (pipelines) the step the simulator
    predicted from the stage times measured in an early step (``PipelineEngine`` logs it), in seconds."""

    tokens: float
    step: float
    simulated: float | None


def launch(spec: dict, timeout: int = 1200) -> Run:
    """One fresh run of ``spec``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "benchmarks.common", json.dumps(spec)], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=timeout)
    match = re.search(r"RESULT ([0-9.]+) ([0-9.]+)", out.stdout)
    if not match:
        raise RuntimeError(f"run failed: {spec}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    simulated = re.search(r"simulated step from the stage times measured in step \d+: ([0-9.e+-]+) s",
                          out.stdout + out.stderr)
    return Run(float(match.group(1)), float(match.group(2)), float(simulated.group(1)) if simulated else None)


def alternate(specs: dict[str, dict], rounds: int) -> dict[str, list[Run]]:
    """Run every spec once per round, in an order that rotates each round; print as results come."""
    names = list(specs)
    results: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            results[name].append(launch(specs[name]))
            run = results[name][-1]
            print(f"round {r}: {name:<32} {run.tokens:10.1f} tokens/s  {run.step:7.3f} s/step", flush=True)
    return results


def median_step(results: list[Run]) -> float:
    return statistics.median(r.step for r in results)


def median_tokens(results: list[Run]) -> float:
    return statistics.median(r.tokens for r in results)


def median_simulated(results: list[Run]) -> float | None:
    values = [r.simulated for r in results if r.simulated is not None]
    return statistics.median(values) if values else None


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
