"""MerakStrategy (pipeline = tensor = 1) against Lightning's own ``ddp`` on the same model, 2 CPU processes.

The two run alternately, several rounds, each a fresh launch, so that machine noise hits both alike; the
ratio of median throughputs is printed (target >= 0.97).

    python -m benchmarks.dp_overhead --rounds 3 --steps 20
"""

from __future__ import annotations

import argparse

from benchmarks.common import alternate, median_tokens

MODEL = {"n_layer": 4, "n_embd": 128, "n_head": 4, "vocab_size": 512, "seq_len": 128}
DATA = {"batch_size": 8, "seq_len": 128, "vocab_size": 512, "n_samples": 4096}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    spec = {"devices": 2, "steps": args.steps, "model": MODEL, "data": DATA}
    results = alternate({"ddp": {**spec, "strategy": "ddp"}, "merak": {**spec, "strategy": {}}}, args.rounds)
    ddp, merak = median_tokens(results["ddp"]), median_tokens(results["merak"])
    print(f"median tokens/s: ddp {ddp:.1f}  merak {merak:.1f}  ratio merak/ddp = {merak / ddp:.3f}")


if __name__ == "__main__":
    main()
