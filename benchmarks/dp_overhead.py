"""MerakStrategy (pipeline = tensor = 1) against Lightning's own ``ddp`` on the same model, 2 CPU processes.

The two run alternately, several rounds, each a fresh launch under Lightning's subprocess launcher, so that
machine noise hits both alike; the ratio of median throughputs is printed (target >= 0.97).

    python benchmarks/dp_overhead.py --rounds 3 --steps 20
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(strategy_name: str, steps: int) -> None:
    import lightning.pytorch as pl
    import torch

    sys.path.insert(0, str(REPO / "examples"))
    from gpt2_pretrain import GPT2Pretrain, TextDataModule

    torch.set_num_threads(1)
    pl.seed_everything(0)
    if strategy_name == "merak":
        from lightning_merak import MerakStrategy

        strategy = MerakStrategy()
    else:
        strategy = "ddp"
    model = GPT2Pretrain(n_layer=4, n_embd=128, n_head=4, vocab_size=512, seq_len=128)
    data = TextDataModule(batch_size=8, seq_len=128, vocab_size=512, n_samples=2048)
    warmup = 3

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == warmup:
                self.start = time.perf_counter()

        def on_train_end(self, trainer, *args):
            if trainer.is_global_zero:
                elapsed = time.perf_counter() - self.start
                tokens = (steps - warmup) * 8 * 128 * trainer.world_size
                print(f"RESULT {strategy_name} {tokens / elapsed:.1f}", flush=True)

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[Timer()])
    trainer.fit(model, datamodule=data)


def launch(strategy_name: str, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, __file__, "--worker", strategy_name, "--steps", str(steps)],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    match = re.search(rf"RESULT {strategy_name} ([0-9.]+)", out.stdout)
    if not match:
        raise RuntimeError(f"{strategy_name} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--worker", choices=["merak", "ddp"])
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return
    results: dict[str, list[float]] = {"ddp": [], "merak": []}
    for r in range(args.rounds):
        for name in ("ddp", "merak") if r % 2 == 0 else ("merak", "ddp"):
            results[name].append(launch(name, args.steps))
            print(f"round {r}: {name:>5} {results[name][-1]:10.1f} tokens/s", flush=True)
    ddp, merak = statistics.median(results["ddp"]), statistics.median(results["merak"])
    print(f"median tokens/s: ddp {ddp:.1f}  merak {merak:.1f}  ratio merak/ddp = {merak / ddp:.3f}")


if __name__ == "__main__":
    main()
