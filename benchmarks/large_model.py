"""Peak memory per rank for a GPT-2 24 x 1024 (355M parameters, 1.3 GiB fp32; vocabulary padded to 50304), relative to the full model's bytes.

Several ways, one after another, each rank measuring its own resident-memory growth from before the model exists to
the peak of two SGD training steps (weights + gradients + activations; SGD keeps no state):

- one process, plain Lightning, the model built in ``__init__``;
- pp=4, the model built eagerly in ``__init__`` (every rank builds all of it on the CPU, then keeps its stage);
- pp=4, built in ``configure_model()`` (meta device; each rank initialises only its stage);
- pp=4, ``from_pretrained(folder)`` in ``configure_model()`` (each rank reads only its stage's tensors);
- pp=2 x tp=2, built in ``configure_model()``;
- pp=4, ``configure_model()`` and ``from_pretrained``, with ``memory_budget`` set to 0.6x (the issue's target)
  and 0.65x the full model's bytes and ``recompute="stage_aware"``: the budget drives the cut (the memory-aware
  partition) and the recompute ratios. A budget no cut can meet ends at start-up with the partition's error,
  which names the least achievable worst stage; the row prints it.

Run: ``.venv/bin/python benchmarks/large_model.py [--layers 24 --width 1024] [--phases] [--cases TEXT]`` (about
10 minutes on 2 cores; ``--phases`` adds each rank's peak/resident growth after the build and after each step,
``--cases`` runs only the configurations whose name contains TEXT).
Resident memory on CPU is what the device would hold on a GPU run: the ranks' parameters live there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

HERE = Path(__file__).resolve()


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _peak() -> int:
    """This process's peak resident memory since it started running this program: the kernel's high-water mark of
    its own address space (``VmHWM``). Not ``getrusage``'s ``ru_maxrss``: Linux carries that across ``exec``
    from the process that spawned it, so rank 0, started by this script's main process after it built and saved
    the whole model, would report that process's peak (about 1.5x the model) as its own."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(args: argparse.Namespace) -> None:
    """One Trainer run (Lightning's launcher starts the other ranks by re-running this command)."""
    import lightning.pytorch as pl
    import torch
    import transformers as tf

    from lightning_merak import MerakStrategy

    baseline = _rss()  # after the imports (about 0.5 GB of libraries): from here on it is the model's

    torch.set_num_threads(1)
    config = tf.GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.width // 64, n_positions=args.seq,
                           vocab_size=50304, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    class GPT(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tf.GPT2LMHeadModel(config) if args.build == "eager" else None

        def configure_model(self) -> None:
            if self.model is None:
                self.model = (tf.GPT2LMHeadModel.from_pretrained(args.folder) if args.build == "pretrained"
                              else tf.GPT2LMHeadModel(config))

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

        def train_dataloader(self):
            ids = torch.randint(0, config.vocab_size, (64, args.seq), generator=torch.Generator().manual_seed(0))
            return torch.utils.data.DataLoader(ids, batch_size=args.batch)

    class Phases(pl.Callback):
        """Peak and resident growth when the model is built (before any step) and after each step: which part of
        the peak the build makes (materialisation, tied copies made equal) and which the steps."""

        def __init__(self) -> None:
            self.marks: list[list[int]] = []

        def on_train_start(self, trainer, pl_module) -> None:
            self.marks.append([_peak() - baseline, _rss() - baseline])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.marks.append([_peak() - baseline, _rss() - baseline])

    pp, tp = args.pp, args.tp
    memory = {"recompute": "stage_aware", "memory_budget": args.budget} if args.budget else {"recompute": "none"}
    strategy = "auto" if pp * tp == 1 else MerakStrategy(pipeline_parallel_size=pp, tensor_parallel_size=tp,
                                                          pipeline_schedule="1f1b", **memory)
    phases = Phases()
    trainer = pl.Trainer(accelerator="cpu", devices=pp * tp, strategy=strategy, max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[phases])
    module = GPT()
    trainer.fit(module)
    peak = _peak()
    from lightning_merak._compat import local_shard

    held = sum(local_shard(p).numel() * p.element_size() for p in module.parameters())  # this rank's weights
    out = Path(args.out) / f"rank{trainer.global_rank}.json"
    out.write_text(json.dumps({"growth": peak - baseline, "held": held, "phases": phases.marks}))


def run(build: str, pp: int, tp: int, common: list[str], folder: str, budget: int = 0) -> tuple[list[dict], str]:
    """Each rank's figures, and the start-up log's memory lines (or the error a budget no cut meets ended on)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(HERE), "--worker", "--build", build, "--pp", str(pp), "--tp", str(tp),
               "--out", out, "--folder", folder, "--budget", str(budget), *common]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        log = done.stdout + done.stderr
        notes = [line.strip() for line in log.splitlines()
                 if ("memory_budget" in line and ("per stage static" in line or "cuts moved" in line
                                                  or "Error" in line))
                 or (budget and "recompute ratio per stage" in line)]
        if done.returncode:
            if budget and any("PartitionError" in n or "MemoryBudgetError" in n for n in notes):
                return [], notes[-1]
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{log[-4000:]}")
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(pp * tp)], "\n".join(notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--build", default="eager")
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--out", default="")
    parser.add_argument("--folder", default="")
    parser.add_argument("--budget", type=int, default=0, help="memory_budget in bytes (0: none)")
    parser.add_argument("--cases", default="", help="run only the configurations whose name contains this")
    parser.add_argument("--phases", action="store_true",
                        help="also print, per rank, peak/resident growth after the build and after each step")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    import transformers as tf

    config = tf.GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.width // 64, n_positions=args.seq,
                           vocab_size=50304)  # padded to a multiple of 64 (Megatron, nanoGPT): tp divides it
    common = ["--layers", str(args.layers), "--width", str(args.width), "--seq", str(args.seq),
              "--batch", str(args.batch)]
    with tempfile.TemporaryDirectory() as folder:
        model = tf.GPT2LMHeadModel(config)
        full = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(folder)  # the "pretrained" checkpoint (random weights: nothing is downloaded)
        del model
        cases = [("one process, eager", "eager", 1, 1, 0.0), ("pp=4, eager __init__", "eager", 4, 1, 0.0),
                 ("pp=4, configure_model", "meta", 4, 1, 0.0), ("pp=4, from_pretrained", "pretrained", 4, 1, 0.0),
                 ("pp=2 x tp=2, configure_model", "meta", 2, 2, 0.0)]
        cases += [(f"pp=4, {name}, budget {share}x", build, 4, 1, share) for share in (0.6, 0.65)
                  for name, build in (("configure_model", "meta"), ("from_pretrained", "pretrained"))]
        print(f"GPT-2 {args.layers} x {args.width}: {full / 2**30:.2f} GiB of fp32 parameters; peak resident-memory "
              "growth per rank over two SGD steps, as a multiple of the full model's bytes; the floor is that rank's "
              "weights + gradients (SGD keeps no state), before any activation")
        print(f"{'configuration':<32} {'max over ranks':>15} {'per rank':>30} {'floor per rank':>30}")
        for name, build, pp, tp, share in [c for c in cases if args.cases in c[0]]:
            ranks, notes = run(build, pp, tp, common, folder, int(share * full))
            if not ranks:
                print(f"{name:<32} no cut fits: {notes}", flush=True)
                continue
            growth = [r["growth"] / full for r in ranks]
            floor = [2 * r["held"] / full for r in ranks]
            print(f"{name:<32} {max(growth):>14.2f}x {str([round(g, 2) for g in growth]):>30} "
                  f"{str([round(f, 2) for f in floor]):>30}", flush=True)
            if notes:
                print("    " + notes.replace("\n", "\n    "), flush=True)
            if args.phases:
                for r, rank in enumerate(ranks):
                    marks = ", ".join(f"{what} {p / full:.2f}/{now / full:.2f}" for what, (p, now) in
                                      zip(["built", *(f"step {i}" for i in range(1, 9))], rank["phases"], strict=False))
                    print(f"    rank {r} peak/resident: {marks}", flush=True)


if __name__ == "__main__":
    main()
