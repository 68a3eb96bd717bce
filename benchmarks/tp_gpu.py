"""GPU check of sub-tensor TP (called from benchmarks/gpu_check.sh; < 1 minute): tp = 2 on ONE GPU.

    python benchmarks/tp_gpu.py

Two ranks share cuda:0. NCCL refuses two ranks on one device ("Duplicate GPU detected"); then this prints a
SKIP line for the NCCL overlap measurement and runs the same comparison over gloo with CUDA tensors, which
checks that plain and sub-tensor TP give the same loss on the GPU (its timings are host-staged gloo, not
NCCL overlap: a real overlap number needs 2 GPUs, i.e. ``benchmarks/tensor_parallel.py --device cuda``).
Exit code 0 unless the numerics differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after an installed copy or PYTHONPATH

from benchmarks.tensor_parallel import parse, report, run  # noqa: E402

SIZE = ["--hidden", "1024", "--heads", "16", "--layers", "4", "--vocab", "8192", "--batch", "8", "--seq", "256",
        "--steps", "3", "--reps", "3", "--timeout", "40"]


def main() -> int:
    if not torch.cuda.is_available():
        print("SKIP tp_gpu: no CUDA device")
        return 0
    status = 0
    for backend in ("nccl", "gloo"):
        args = parse(["--device", "cuda", "--backend", backend, *SIZE])
        try:
            losses, times = run(args)
        except RuntimeError as e:
            reason = str(e).splitlines()[0][:300]
            print(f"SKIP tp_gpu {backend}: two ranks on one GPU failed ({reason})")
            continue
        print(report(losses, times, f"one {torch.cuda.get_device_name(0)} shared by 2 ranks, {backend}"))
        if max(abs(v - losses[1]) for v in losses.values()) > 1e-4:
            print(f"FAIL tp_gpu {backend}: sub-tensor TP loss differs from plain TP: {losses}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
