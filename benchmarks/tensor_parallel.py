"""Plain TP vs Merak's sub-tensor TP (k = 2, 4) at tp = 2: forward + backward time of a GPT-2-shaped model.

    python benchmarks/tensor_parallel.py                      # CPU, 2 gloo processes
    python benchmarks/tensor_parallel.py --device cuda        # see benchmarks/tp_gpu.py for one-GPU use

Variants run alternating (1, 2, 4, 1, 2, 4, ...) so that load from other processes hits all of them alike;
the ratio printed is plain-TP time / variant time (> 1: the overlap helps). Every variant is checked to give
the same loss as plain TP first.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after an installed copy or PYTHONPATH


def _model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.hidden, n_layer=args.layers,
                        n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_merak.tensor_parallel import apply_tensor_parallel, tp_plan_for

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(args.backend, rank=rank, world_size=world,
                                device_id=device if args.backend == "nccl" else None,
                                timeout=datetime.timedelta(seconds=30))
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("tp",))
        variants = [1, *args.chunks]
        models = {}
        for k in variants:
            model = _model(args).to(device)
            models[k] = apply_tensor_parallel(model, mesh["tp"], tp_plan_for(model, world), subtensor_chunks=k)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)

        def step(k: int) -> torch.Tensor:
            loss = models[k](input_ids=ids, labels=ids).loss
            loss.backward()
            return loss.detach()

        losses = {k: float(step(k)) for k in variants}  # also the warm-up
        times: dict[int, list[float]] = {k: [] for k in variants}
        for _ in range(args.reps):
            for k in variants:
                dist.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(k)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[k].append((time.perf_counter() - start) / args.steps)
        if rank == 0:
            queue.put(("ok", losses, times))
    except Exception as e:  # the parent prints the reason (e.g. NCCL refusing two ranks on one GPU)
        if rank == 0:
            queue.put(("error", f"{type(e).__name__}: {e}", None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args: argparse.Namespace) -> tuple[dict[int, float], dict[int, list[float]]]:
    """Spawn ``args.tp`` ranks; return (loss per variant, seconds per step per repetition and variant)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.tp, port, args, queue), daemon=True) for r in range(args.tp)]
    for p in procs:
        p.start()
    try:
        status, losses, times = queue.get(timeout=args.timeout)
    except Exception:
        status, losses, times = "error", f"no result within {args.timeout}s", None
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
    if status != "ok":
        raise RuntimeError(losses)
    return losses, times


def report(losses: dict[int, float], times: dict[int, list[float]], label: str) -> str:
    plain = statistics.median(times[1])
    lines = [f"{label}: forward+backward per step, median of {len(times[1])} alternating repetitions"]
    for k, ts in times.items():
        name = "plain TP (k=1)" if k == 1 else f"sub-tensor TP k={k}"
        med = statistics.median(ts)
        lines.append(f"  {name:<26} {med * 1e3:8.2f} ms   ratio plain/this {plain / med:5.3f}   "
                     f"loss {losses[k]:.6f} (Δ vs plain {abs(losses[k] - losses[1]):.1e})")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backend", default=None, help="default: gloo on cpu, nccl on cuda")
    parser.add_argument("--tp", type=int, default=2, help="ranks (1 measures the chunking overhead alone)")
    parser.add_argument("--chunks", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    args.backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    losses, times = run(args)
    print(report(losses, times, f"tp={args.tp} {args.device}/{args.backend}, GPT-2 {args.layers}x{args.hidden}, "
                                f"batch {args.batch}x{args.seq}"))


if __name__ == "__main__":
    main()
