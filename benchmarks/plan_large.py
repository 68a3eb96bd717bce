"""Plan a GPT-style ~20B-parameter model into 8 pipeline stages on the meta device: seconds and peak memory.

Targets: under 60 s and 4 GiB of resident memory on one CPU (the capture runs on a meta twin, no weights exist).
Run: ``.venv/bin/python benchmarks/plan_large.py [--layers 44 --hidden 6144 --heads 48 --seq 2048 --stages 8]``
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import transformers as tf

from lightning_merak.partition import plan_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=44)
    parser.add_argument("--hidden", type=int, default=6144)
    parser.add_argument("--heads", type=int, default=48)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--stages", type=int, default=8)
    args = parser.parse_args()
    config = tf.GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.heads, vocab_size=50257,
                           n_positions=args.seq)
    start = time.perf_counter()
    with torch.device("meta"):
        model = tf.GPT2LMHeadModel(config)
    built = time.perf_counter() - start
    ids = torch.zeros(args.batch, args.seq, dtype=torch.long, device="meta")
    plan = plan_model(model, ((), {"input_ids": ids, "labels": ids}), args.stages)
    seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    params = sum(p.numel() for p in model.parameters())
    print(plan.table())
    print(f"{params / 1e9:.2f}B parameters, {args.stages} stages: {seconds:.1f} s (model built in {built:.1f} s), "
          f"peak RSS {peak_gib:.2f} GiB")


if __name__ == "__main__":
    main()
