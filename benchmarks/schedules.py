"""Merak's schedule against the Megatron-LM / DeepSpeed baseline, measured side by side on CPU processes.

Three configurations of the same GPT-2, pipeline of 2 stages, same batch and micro-batches:

- ``1f1b + full recompute``: the baseline (every stage checkpoints every block);
- ``1f1b, no recompute``: what the baseline would do with unlimited memory;
- ``shifted_critical_path + stage_aware``: Merak; the memory budget is set halfway between the simulated
  stage-0 peaks with and without recomputation, so stage-aware recomputation recomputes part of stage 0 and
  nothing on the last stage, and the cool-down recomputation happens before the gradients arrive.

Each runs in fresh launches, alternating; the script prints measured step-time speed-ups over the baseline next
to the simulator's predictions from the same partition plan (FLOPs as costs, no communication).

    python -m benchmarks.schedules --rounds 2 --steps 10
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import alternate, median_step

MODEL = {"n_layer": 8, "n_embd": 128, "n_head": 4, "vocab_size": 512, "seq_len": 128}
DATA = {"batch_size": 16, "seq_len": 128, "vocab_size": 512, "n_samples": 4096}
STAGES, MICRO = 2, 4


def simulated() -> tuple[dict[str, float], float, list[float]]:
    """Predicted step times (FLOP units) per configuration, the budget used, and stage-aware's ratios."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_merak.partition import plan_model
    from lightning_merak.pipeline.plan import make_schedule, resolve_ratios, simulate
    from lightning_merak.pipeline.plan.simulate import with_ratios

    config = GPT2Config(n_layer=MODEL["n_layer"], n_embd=MODEL["n_embd"], n_head=MODEL["n_head"],
                        vocab_size=MODEL["vocab_size"], n_positions=MODEL["seq_len"], tie_word_embeddings=False)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    ids = torch.zeros(DATA["batch_size"] // MICRO, DATA["seq_len"], dtype=torch.long)
    plan = plan_model(model, ((), {"input_ids": ids, "labels": ids}), STAGES)
    costs = plan.stage_costs()
    layers = max(len(s.units) for s in plan.stages)
    one_f = make_schedule("1f1b", STAGES, MICRO)
    scp = make_schedule("shifted_critical_path", STAGES, MICRO)
    peak = [simulate(one_f, with_ratios(costs, [r] * STAGES)).peak_memory_per_rank[0] + costs[0].static_bytes
            for r in (0.0, 1.0)]
    budget = (peak[0] + peak[1]) / 2
    ratios = resolve_ratios("stage_aware", scp, costs, budget, layers_per_stage=layers)
    times = {
        "1f1b + full recompute": simulate(one_f, with_ratios(costs, [1.0] * STAGES)).makespan,
        "1f1b, no recompute": simulate(one_f, costs).makespan,
        "shifted_critical_path + stage_aware": simulate(scp, with_ratios(costs, ratios)).makespan,
    }
    return times, budget, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    predicted, budget, ratios = simulated()
    print(f"stage-aware budget {budget:.0f} B per device -> recompute ratios per stage {ratios}")
    base = {"devices": STAGES, "steps": args.steps, "model": MODEL, "data": DATA}
    pp = {"pipeline_parallel_size": STAGES, "num_microbatches": MICRO}
    specs = {
        "1f1b + full recompute": {**base, "strategy": {**pp, "pipeline_schedule": "1f1b", "recompute": "full"}},
        "1f1b, no recompute": {**base, "strategy": {**pp, "pipeline_schedule": "1f1b", "recompute": "none"}},
        "shifted_critical_path + stage_aware": {**base, "strategy": {
            **pp, "pipeline_schedule": "shifted_critical_path", "recompute": "stage_aware", "memory_budget": budget}},
    }
    results = alternate(specs, args.rounds)
    baseline = median_step(results["1f1b + full recompute"])
    base_sim = predicted["1f1b + full recompute"]
    print(f"{'configuration':<38} {'s/step':>8} {'measured x':>11} {'simulated x':>12} {'sim error':>10}")
    for name in specs:
        measured = baseline / median_step(results[name])
        sim = base_sim / predicted[name]
        print(f"{name:<38} {median_step(results[name]):8.3f} {measured:11.3f} {sim:12.3f} "
              f"{abs(measured - sim) / sim:9.1%}")


if __name__ == "__main__":
    main()
