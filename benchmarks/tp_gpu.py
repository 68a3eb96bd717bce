"""GPU check of sub-tensor TP (called from benchmarks/gpu_check.sh; < 1 minute on one GPU).

    python benchmarks/tp_gpu.py

1. tp = 2 with two ranks sharing cuda:0 over NCCL: the overlap measurement. NCCL (2.28 here) refuses two
   ranks on one device ("invalid usage"): then it prints a SKIP line saying so. A real overlap number needs
   two GPUs: ``python benchmarks/tensor_parallel.py --device cuda``.
2. tp = 1 on cuda:0 over NCCL: the same model with k = 1, 2, 4 — the cost side of sub-tensor TP (smaller
   matmuls, more kernel launches) with nothing to overlap, and equal losses on the GPU.

(gloo with CUDA tensors on one shared GPU hung in a trial, so it is not used.) Exit code 0 unless losses differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after an installed copy or PYTHONPATH

from benchmarks.tensor_parallel import parse, report, run  # noqa: E402

SIZE = ["--hidden", "1024", "--heads", "16", "--layers", "4", "--vocab", "8192", "--batch", "8", "--seq", "256",
        "--steps", "3", "--reps", "3", "--timeout", "25"]


def main() -> int:
    if not torch.cuda.is_available():
        print("SKIP tp_gpu: no CUDA device")
        return 0
    name = torch.cuda.get_device_name(0)
    status = 0
    for tp, label in ((2, f"tp=2, 2 ranks sharing one {name}, nccl"), (1, f"tp=1 on one {name}, nccl (no peer)")):
        args = parse(["--device", "cuda", "--backend", "nccl", "--tp", str(tp), *SIZE])
        try:
            losses, times = run(args)
        except RuntimeError as e:
            print(f"SKIP tp_gpu {label}: {str(e).splitlines()[0][:300]}")
            continue
        print(report(losses, times, label))
        if max(abs(v - losses[1]) for v in losses.values()) > 1e-4:
            print(f"FAIL tp_gpu {label}: sub-tensor TP loss differs from plain TP: {losses}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
