"""MerakStrategy's defaults against its peers on the same model: a hand-written torch.distributed.pipelining
1F1B pipeline and DeepSpeed's PipelineEngine, pp = 2 on CPU processes (gloo), fp32 AdamW.

The model is a plain-torch GPT (8 blocks, width 256, 4 heads, vocabulary 512, sequence 128) written here
once, so all three run exactly the same layers with the same initial weights and the same batches (16 x 128,
4 micro-batches):

- ``merak defaults``: a LightningModule holding the GPT, ``MerakStrategy(pipeline_parallel_size=2,
  num_microbatches=4)`` and nothing else (Lightning's launcher starts the second process);
- ``torch Schedule1F1B``: the same two stages cut by hand (embedding + blocks 0-3 | blocks 4-7 + head),
  ``PipelineStage`` + ``Schedule1F1B``, under torchrun;
- ``DeepSpeed PipelineEngine``: ``PipelineModule`` over the same ten layers (``partition_method="uniform"``
  gives the same cut), ``DS_ACCELERATOR=cpu``, gloo, under torchrun, in a virtual environment of its own that
  this script makes on first use (torch==2.13.0 first, so that deepspeed does not pull another torch, then
  deepspeed). DeepSpeed is never a dependency of the package; if it cannot be installed or run, the script says
  why and reports the other two.

Each configuration is a fresh launch; the order rotates every round; a run's step time is its mean over the
steps after warm-up, and the table gives the median over rounds. The machine is shared and noisy: read the
ratios, and the spread between rounds, not absolute times.

    python -m benchmarks.peers --rounds 3 --steps 12
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
MODEL = {"n_layer": 8, "n_embd": 256, "n_head": 4, "vocab_size": 512, "seq_len": 128}
BATCH, MICRO, LR, WARMUP = 16, 4, 3e-3, 3
DEEPSPEED_VENV = Path(os.environ.get("MERAK_DEEPSPEED_VENV", Path.home() / ".cache/lightning-merak/deepspeed-venv"))
TORCH_PIN = "torch==2.13.0"


# ------------------------------------------------------------------------------------------------ the model
class Embed(nn.Module):
    def __init__(self, vocab_size: int, n_embd: int, seq_len: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(seq_len, n_embd)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x GELU MLP."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.fc, self.out = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Head(nn.Module):
    def __init__(self, n_embd: int, vocab_size: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class GPT(nn.Module):
    def __init__(self, n_layer: int, n_embd: int, n_head: int, vocab_size: int, seq_len: int) -> None:
        super().__init__()
        self.embed = Embed(vocab_size, n_embd, seq_len)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.head = Head(n_embd, vocab_size)

    def layers(self) -> list[nn.Module]:
        return [self.embed, *self.blocks, self.head]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return lm_loss(self.head(x), targets)


def build_model() -> GPT:
    torch.manual_seed(0)
    return GPT(**MODEL)


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``steps`` global batches (inputs, next-token targets), sampled from a fixed random bigram
    table; batch k is the same whatever ``steps`` is."""
    v, t = MODEL["vocab_size"], MODEL["seq_len"]
    table = torch.randint(0, v, (v, 4), generator=torch.Generator().manual_seed(0))
    out = []
    for step in range(steps):
        g = torch.Generator().manual_seed(1 + step)
        tokens = torch.empty(BATCH, t + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, v, (BATCH,), generator=g)
        choice = torch.randint(0, 4, (BATCH, t), generator=g)
        for i in range(t):
            tokens[:, i + 1] = table[tokens[:, i], choice[:, i]]
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def report(step_times: list[float], cpu_times: list[float], losses: list[float], note: str = "") -> None:
    """One line for the driver: mean wall-clock and CPU seconds per step after warm-up (CPU: of the reporting
    rank's process, a load-independent view of the work it does), every step's time, the losses."""
    timed, cpu = step_times[WARMUP:], cpu_times[WARMUP:]
    print("RESULT " + json.dumps({"step": sum(timed) / len(timed), "cpu": sum(cpu) / len(cpu), "times": step_times,
                                  "losses": losses, "note": note}), flush=True)


# ------------------------------------------------------------------------------------------------ workers
def worker_merak(steps: int) -> None:
    import lightning.pytorch as pl

    from lightning_merak import MerakStrategy

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_model()

        def training_step(self, batch, batch_idx):
            return self.model(batch["input_ids"], batch["labels"])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=LR)

    data = [{"input_ids": x[i], "labels": y[i]} for x, y in batches(steps) for i in range(BATCH)]

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.ends: list[tuple[float, float]] = []   # (wall, CPU) seconds of each step
            self.losses: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.ends.append((time.perf_counter(), time.process_time()))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            start, cpu = self.ends.pop()
            self.ends.append((time.perf_counter() - start, time.process_time() - cpu))
            self.losses.append(float(outputs["loss"]))

        def on_train_end(self, trainer, pl_module):
            if trainer.is_global_zero:
                report([w for w, _ in self.ends], [c for _, c in self.ends], self.losses)

    timer = Timer()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=MerakStrategy(pipeline_parallel_size=2,
                                                                              num_microbatches=MICRO),
                         max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer], use_distributed_sampler=False)
    # one replica (dp = 1): both pipeline ranks read the same sequential loader, the batches of the other two
    trainer.fit(Module(), train_dataloaders=torch.utils.data.DataLoader(data, batch_size=BATCH))


def _two_stages(model: GPT, rank: int) -> nn.Module:
    layers = model.layers()
    half = len(layers) // 2    # embedding + blocks 0-3 | blocks 4-7 + head: Merak's and DeepSpeed's cut
    return nn.Sequential(*(layers[:half] if rank == 0 else layers[half:]))


def worker_torch(steps: int) -> None:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    stage_module = _two_stages(build_model(), rank)
    stage = PipelineStage(stage_module, rank, 2, torch.device("cpu"))
    schedule = Schedule1F1B(stage, MICRO, loss_fn=lm_loss)
    optimizer = torch.optim.AdamW(stage_module.parameters(), lr=LR)
    times, cpus, losses = [], [], []
    for x, y in batches(steps):
        start, cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad()
        if rank == 0:
            schedule.step(x)
        else:
            mb_losses: list[torch.Tensor] = []
            schedule.step(target=y, losses=mb_losses)
            losses.append(float(torch.stack(mb_losses).detach().mean()))
        optimizer.step()
        times.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    if rank == 1:
        report(times, cpus, losses)
    dist.destroy_process_group()


def worker_deepspeed(steps: int) -> None:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.pipe import PipelineModule

    deepspeed.init_distributed(dist_backend="gloo")
    model = build_model()
    pipe = PipelineModule(layers=model.layers(), num_stages=2, loss_fn=lm_loss, partition_method="uniform",
                          activation_checkpoint_interval=0)
    params = [p for p in pipe.parameters() if p.requires_grad]
    config = {"train_batch_size": BATCH, "train_micro_batch_size_per_gpu": BATCH // MICRO,
              "gradient_accumulation_steps": MICRO, "steps_per_print": 10**9, "zero_optimization": {"stage": 0},
              "wall_clock_breakdown": False}
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=torch.optim.AdamW(params, lr=LR), config=config)
    times, cpus, losses = [], [], []
    for x, y in batches(steps):
        micro = iter(zip(x.chunk(MICRO), y.chunk(MICRO), strict=True))
        start, cpu = time.perf_counter(), time.process_time()
        loss = engine.train_batch(data_iter=micro)
        times.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
        losses.append(float(loss))
    if dist.get_rank() == 0:
        report(times, cpus, losses, note=f"stage boundaries {list(pipe.parts)}")


WORKERS = {"merak": worker_merak, "torch": worker_torch, "deepspeed": worker_deepspeed}


# ------------------------------------------------------------------------------------------------ driver
def deepspeed_python() -> tuple[str | None, str]:
    """The DeepSpeed environment's interpreter, made on first use; (None, why) when it cannot be had."""
    python = DEEPSPEED_VENV / "bin" / "python"
    probe = [str(python), "-c", "import deepspeed, torch; print(deepspeed.__version__, torch.__version__)"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    if not python.exists():
        print(f"making DeepSpeed's virtual environment in {DEEPSPEED_VENV} ({TORCH_PIN}, then deepspeed) ...",
              flush=True)
        steps = [[sys.executable, "-m", "venv", str(DEEPSPEED_VENV)],
                 [str(python), "-m", "pip", "install", "-q", TORCH_PIN],
                 [str(python), "-m", "pip", "install", "-q", "deepspeed"]]
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if done.returncode:
                return None, f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout).strip()[-800:]}"
    done = subprocess.run(probe, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode:
        return None, f"deepspeed does not import in {DEEPSPEED_VENV}: {done.stderr.strip()[-800:]}"
    return str(python), f"deepspeed {done.stdout.split()[0]} on torch {done.stdout.split()[1]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(name: str, steps: int, ds_python: str | None) -> list[str]:
    if name == "merak":
        return [sys.executable, "-m", "benchmarks.peers", "--worker", "merak", "--steps", str(steps)]
    python = ds_python if name == "deepspeed" else sys.executable
    return [python, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), "-m", "benchmarks.peers", "--worker", name, "--steps", str(steps)]


def launch(name: str, steps: int, ds_python: str | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    out = subprocess.run(command(name, steps, ds_python), capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=1800)
    match = re.search(r"^RESULT (.*)$", out.stdout, re.M)
    if out.returncode or not match:
        raise RuntimeError(f"{name} failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    result = json.loads(match.group(1))
    chose = re.search(r"pipeline_schedule='auto' chose (\S+)", out.stdout + out.stderr)
    if chose:
        result["note"] = f"auto chose {chose.group(1)}"
    return result


LABELS = {"merak": "merak defaults", "torch": "torch Schedule1F1B (hand-written)",
          "deepspeed": "DeepSpeed PipelineEngine"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--worker", choices=sorted(WORKERS))
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(1)
        WORKERS[args.worker](args.steps)
        return
    if args.steps <= WARMUP:
        parser.error(f"--steps must exceed the {WARMUP} warm-up steps.")
    names = ["merak", "torch", "deepspeed"]
    ds_python, ds_status = deepspeed_python()
    print(f"DeepSpeed: {ds_status}", flush=True)
    if ds_python is None:
        print("DeepSpeed cannot be installed here: reporting merak defaults against torch's 1F1B only.", flush=True)
        names.remove("deepspeed")
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            try:
                results[name].append(launch(name, args.steps, ds_python))
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                if name != "deepspeed":
                    raise
                print(f"DeepSpeed could not run here, reporting the other two: {str(err)[-1500:]}", flush=True)
                names.remove("deepspeed")
                del results["deepspeed"]
                break
            res = results[name][-1]
            print(f"round {r}: {LABELS[name]:<36} {res['step']:7.3f} s/step  {res['note']}", flush=True)
    median = {n: statistics.median(x["step"] for x in results[n]) for n in names}
    print(f"\n{'configuration':<36} {'median s/step':>13} {'merak x':>8}  losses (first run)")
    for n in names:
        losses = " ".join(f"{v:.4f}" for v in results[n][0]["losses"])
        print(f"{LABELS[n]:<36} {median[n]:13.3f} {median[n] / median['merak']:8.3f}  {losses}")
    spread = {n: (min(x["step"] for x in results[n]), max(x["step"] for x in results[n])) for n in names}
    print("spread over rounds (s/step): " + ", ".join(f"{LABELS[n]} {a:.3f}-{b:.3f}" for n, (a, b) in spread.items()))
    for n in names[1:]:
        gap = max(abs(a - b) for a, b in zip(results["merak"][0]["losses"], results[n][0]["losses"], strict=True))
        print(f"merak defaults vs {LABELS[n]}: x{median[n] / median['merak']:.3f} (target >= 1.15), "
              f"largest loss difference {gap:.2e}" + ("" if math.isfinite(gap) else " (not finite)"))


if __name__ == "__main__":
    main()
