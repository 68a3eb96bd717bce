"""One process against pp = 2 with torch's GPipe and 1F1B schedules, same GPT-2 and global batch, on CPU.

Configurations run alternately (fresh launches, rotating order) and the ratios of median throughput to the
one-process run are printed. On this 2-core machine the pipeline's two processes share the cores the single
process uses alone, so the ratio measures pipeline overhead and bubble rather than a speed-up.

    python -m benchmarks.pipeline --rounds 2 --steps 12
"""

from __future__ import annotations

import argparse

from benchmarks.common import alternate, median_tokens

MODEL = {"n_layer": 8, "n_embd": 128, "n_head": 4, "vocab_size": 512, "seq_len": 128}
DATA = {"batch_size": 16, "seq_len": 128, "vocab_size": 512, "n_samples": 4096}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    base = {"steps": args.steps, "model": MODEL, "data": DATA}
    pp = {"pipeline_parallel_size": 2, "num_microbatches": 4, "recompute": "none"}
    specs = {
        "one process": {**base, "devices": 1, "strategy": {}},
        "pp=2 gpipe": {**base, "devices": 2, "strategy": {**pp, "pipeline_schedule": "gpipe"}},
        "pp=2 1f1b": {**base, "devices": 2, "strategy": {**pp, "pipeline_schedule": "1f1b"}},
    }
    results = alternate(specs, args.rounds)
    one = median_tokens(results["one process"])
    for name in specs:
        print(f"{name:<14} {median_tokens(results[name]):10.1f} tokens/s   x one process "
              f"{median_tokens(results[name]) / one:.3f}")


if __name__ == "__main__":
    main()
