"""Merak's schedules against the Megatron-LM / DeepSpeed baseline, measured side by side on CPU processes, next
to what the simulator predicts for each.

Configurations of the same GPT-2, pipeline of 2 ranks, same batch and micro-batches:

- ``1f1b + full recompute``: the baseline (every stage checkpoints every block);
- ``1f1b, no recompute``: what the baseline would do with unlimited memory;
- ``shifted_critical_path + stage_aware``: Merak; the memory budget is set halfway between the simulated
  stage-0 peaks of 1F1B with and without recomputation (a stage-0-only budget), so stage-aware recomputation
  recomputes part of stage 0 and nothing on the last stage, and the cool-down recomputation happens before
  the gradients arrive;
- ``interleaved_1f1b`` and ``zbv``, no recompute: two stages per rank, on the 2p-stage partition;
- ``auto (defaults)``: ``MerakStrategy``'s defaults, no budget; ``auto + stage-0 budget``: the same budget as
  Merak's row. The simulated column of the auto rows is that of the schedule auto chooses (named beside it).

Each runs in fresh launches, alternating. Two predictions stand beside each measured step:

- the speed-up over the baseline that the FLOP model predicts from the same partition plans (FLOPs as costs, no
  communication): what ``auto`` decides the placement by, before any step;
- the step time the simulator predicts from the stage times measured in step 1 of that run (the engine logs it
  for every schedule; ``auto`` re-chooses by it): the simulator's own error, the cost model aside. The error is
  taken per launch (its prediction against its own measured step), then the median over the rounds, so that
  the machine's drift between launches does not count as the simulator's.

Last, the defaults' median step against the fastest named configuration's.

    python -m benchmarks.schedules --rounds 2 --steps 10
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.common import alternate, median_simulated, median_step

MODEL = {"n_layer": 8, "n_embd": 128, "n_head": 4, "vocab_size": 512, "seq_len": 128}
DATA = {"batch_size": 16, "seq_len": 128, "vocab_size": 512, "n_samples": 4096}
STAGES, MICRO = 2, 4


def plans() -> dict[int, object]:
    """The partition plans the strategy makes for one and two stages per rank (same model, meta device)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_merak.partition import plan_model

    config = GPT2Config(n_layer=MODEL["n_layer"], n_embd=MODEL["n_embd"], n_head=MODEL["n_head"],
                        vocab_size=MODEL["vocab_size"], n_positions=MODEL["seq_len"], tie_word_embeddings=False)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    ids = torch.zeros(DATA["batch_size"] // MICRO, DATA["seq_len"], dtype=torch.long)
    return {k: plan_model(model, ((), {"input_ids": ids, "labels": ids}), STAGES * k) for k in (1, 2)}


def stage0_budget(costs: list) -> float:
    """Halfway between 1F1B's simulated stage-0 peaks (static included) with and without full recomputation."""
    from lightning_merak.pipeline.plan import make_schedule, simulate
    from lightning_merak.pipeline.plan.simulate import with_ratios

    one_f = make_schedule("1f1b", STAGES, MICRO)
    peak = [simulate(one_f, with_ratios(costs, [r] * STAGES)).peak_memory_per_rank[0] + costs[0].static_bytes
            for r in (0.0, 1.0)]
    return (peak[0] + peak[1]) / 2


def simulated() -> tuple[dict[str, float], dict[str, str], float, list[float]]:
    """Predicted step times (FLOP units) per configuration, the schedule each auto row chooses, the budget, and
    stage-aware's ratios for the shifted critical path."""
    from lightning_merak.pipeline.plan import make_schedule, resolve_ratios, simulate
    from lightning_merak.pipeline.plan.choose import AutoSchedule
    from lightning_merak.pipeline.plan.simulate import with_ratios

    planned = plans()
    by_placement = {k: plan.stage_costs() for k, plan in planned.items()}
    blocks = {k: [len(s.units) for s in plan.stages] for k, plan in planned.items()}
    costs = by_placement[1]
    layers = max(blocks[1])
    budget = stage0_budget(costs)
    one_f = make_schedule("1f1b", STAGES, MICRO)
    scp = make_schedule("shifted_critical_path", STAGES, MICRO)
    ratios = resolve_ratios("stage_aware", scp, costs, budget, layers_per_stage=layers)
    times = {
        "1f1b + full recompute": simulate(one_f, with_ratios(costs, [1.0] * STAGES)).makespan,
        "1f1b, no recompute": simulate(one_f, costs).makespan,
        "shifted_critical_path + stage_aware": simulate(scp, with_ratios(costs, ratios)).makespan,
        "interleaved_1f1b, no recompute": simulate(make_schedule("interleaved_1f1b", STAGES, MICRO),
                                                   by_placement[2]).makespan,
        "zbv, no recompute": simulate(make_schedule("zbv", STAGES, MICRO), by_placement[2]).makespan,
    }
    chosen = {}
    for name, budget_of_row in (("auto (defaults)", None), ("auto + stage-0 budget", budget)):
        auto = AutoSchedule("auto", "stage_aware", budget_of_row, STAGES, MICRO, by_placement, blocks=blocks)
        decided = make_schedule(auto.decision.name, STAGES, MICRO)
        times[name] = simulate(decided, with_ratios(auto.costs, auto.ratios)).makespan
        chosen[name] = f"{auto.decision.name} {[round(r, 2) for r in auto.ratios]}"
    return times, chosen, budget, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    predicted, chosen, budget, ratios = simulated()
    print(f"stage-0 budget {budget:.0f} B per device -> shifted_critical_path's stage-aware ratios {ratios}; "
          f"auto chooses: {chosen}")
    base = {"devices": STAGES, "steps": args.steps, "model": MODEL, "data": DATA}
    pp = {"pipeline_parallel_size": STAGES, "num_microbatches": MICRO}
    none = {**pp, "recompute": "none"}
    specs = {
        "1f1b + full recompute": {**base, "strategy": {**pp, "pipeline_schedule": "1f1b", "recompute": "full"}},
        "1f1b, no recompute": {**base, "strategy": {**none, "pipeline_schedule": "1f1b"}},
        "shifted_critical_path + stage_aware": {**base, "strategy": {
            **pp, "pipeline_schedule": "shifted_critical_path", "recompute": "stage_aware", "memory_budget": budget}},
        "interleaved_1f1b, no recompute": {**base, "strategy": {**none, "pipeline_schedule": "interleaved_1f1b"}},
        "zbv, no recompute": {**base, "strategy": {**none, "pipeline_schedule": "zbv"}},
        "auto (defaults)": {**base, "strategy": pp},
        "auto + stage-0 budget": {**base, "strategy": {**pp, "memory_budget": budget}},
    }
    results = alternate(specs, args.rounds)
    baseline = median_step(results["1f1b + full recompute"])
    base_sim = predicted["1f1b + full recompute"]
    print(f"{'configuration':<38} {'s/step':>8} {'measured x':>11} {'FLOP model x':>13} {'its error':>10} "
          f"{'simulated s':>12} {'sim error':>10}  chosen")
    for name in specs:
        step = median_step(results[name])
        measured = baseline / step
        flops = base_sim / predicted[name]
        sim = median_simulated(results[name])
        errors = [abs(r.step - r.simulated) / r.step for r in results[name] if r.simulated is not None]
        sim_text = f"{sim:12.3f} {statistics.median(errors):9.1%}" if errors else f"{'-':>12} {'-':>10}"
        print(f"{name:<38} {step:8.3f} {measured:11.3f} {flops:13.3f} {abs(measured - flops) / flops:9.1%} "
              f"{sim_text}  {chosen.get(name, '')}")
    named = [n for n in specs if not n.startswith("auto")]
    best = min(named, key=lambda n: median_step(results[n]))
    ratio = median_step(results[best]) / median_step(results["auto (defaults)"])
    print(f"defaults / fastest named ({best}): {ratio:.3f} (median steps)")


if __name__ == "__main__":
    main()
