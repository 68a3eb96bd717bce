"""ZeRO stages 0 / 1 / 2 on the example GPT-2, dp = 2 CPU processes: throughput and per-rank optimizer state.

The three stages run alternately, several rounds, each a fresh launch (``benchmarks.common``), so machine noise
hits them alike; printed are the median tokens/s, the ratio to stage 0 (target >= 0.95 on CPU) and the bytes
of AdamW state each rank holds: the example's real optimizer state, split by the same ownership rule that
``ShardedOptimizer`` applies (``ParameterOwnership.balanced`` over full parameter sizes).

    python -m benchmarks.zero --rounds 3 --steps 20
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import REPO, alternate, median_tokens
from benchmarks.dp_overhead import DATA, MODEL
from lightning_merak.units import format_bytes
from lightning_merak.zero import ParameterOwnership, parameter_state_bytes

STAGES = (0, 1, 2)
WORLD = 2


def state_bytes_per_rank(zero_stage: int) -> list[int]:
    """Per dp rank, the AdamW state bytes of the example model under ``zero_stage`` (state made by one step)."""
    sys.path.insert(0, str(REPO / "examples"))
    from gpt2_pretrain import GPT2Pretrain

    model = GPT2Pretrain(**MODEL)
    optimizer = model.configure_optimizers()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    per_param = [parameter_state_bytes(optimizer.state[p]) for p in params]
    if zero_stage == 0:
        return [sum(per_param)] * WORLD
    ownership = ParameterOwnership.balanced([p.numel() * p.element_size() for p in params], WORLD)
    return [sum(per_param[i] for i in ownership.owned(r)) for r in range(WORLD)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    spec = {"devices": WORLD, "steps": args.steps, "model": MODEL, "data": DATA}
    results = alternate({f"zero_stage={s}": {**spec, "strategy": {"zero_stage": s}} for s in STAGES}, args.rounds)
    base = median_tokens(results["zero_stage=0"])
    for s in STAGES:
        tokens = median_tokens(results[f"zero_stage={s}"])
        per_rank = "  ".join(format_bytes(b) for b in state_bytes_per_rank(s))
        print(f"zero_stage={s}: median {tokens:8.1f} tokens/s  ratio to stage 0 {tokens / base:.3f}  "
              f"optimizer state per rank: {per_rank}")


if __name__ == "__main__":
    main()
