"""Paper-scale projection: ``lightning-merak simulate`` predicts a GPT step on many devices.

It compares Merak's combination — shifted critical path + stage-aware recomputation (the least per-stage
ratio whose simulated peak fits device memory) + sub-tensor TP overlap — with Megatron/DeepSpeed-style 1F1B
and full recomputation, on the same 3D layout. Nothing is measured: costs are analytic.

Assumptions (all printed with ``--verbose`` and overridable):

- FLOPs per transformer layer and micro-batch (b sequences of s tokens, hidden h), forward:
  24·b·s·h² + 4·b·s²·h, divided over the tp ranks; backward 2× forward; the LM head (2·b·s·h·V forward,
  vocabulary-parallel) on the last stage. Time = FLOPs / ``--flops`` (a sustained, not peak, rate).
- Recomputation of a share r re-runs r of the forward, its TP all-reduces included.
- TP: 2 all-reduces of b·s·h half-precision values per layer in forward, 2 in backward; ring cost
  2(t−1)/t · bytes / ``--tp-bandwidth`` + latency. With sub-tensor overlap (k chunks) only the first chunk's
  share and whatever the remaining chunks' compute cannot cover stays exposed.
- PP: one b·s·h half-precision tensor per micro-batch and direction over ``--pp-bandwidth``.
- DP: after the pipeline drains, a ring all-reduce of the stage's half-precision gradients over
  ``--dp-bandwidth``, not overlapped; the slowest stage counts. The optimizer step is ignored.
- Memory: activations per layer and micro-batch from Korthikanti et al. (2022), no sequence parallelism:
  s·b·h·(10 + 24/t + 5·a·s/(h·t)) bytes; a fully checkpointed layer keeps its 2·s·b·h-byte input.
  Static memory 16 bytes per local parameter (fp16 weights and grads, fp32 master, Adam m and v).
  Budget: ``--memory`` × 0.9 per device.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace

from lightning_merak.config import parse_bytes
from lightning_merak.pipeline.plan.recompute import MemoryBudgetError, ratios_for_budget
from lightning_merak.pipeline.plan.schedules import make_schedule
from lightning_merak.pipeline.plan.simulate import LinkCosts, StageCosts, simulate, with_ratios


@dataclass(frozen=True)
class ModelConfig:
    """A GPT-style decoder (Megatron layout, tied embeddings)."""

    layers: int
    hidden: int
    heads: int
    sequence: int = 1024
    vocab: int = 50257

    @property
    def parameters(self) -> float:
        return 12 * self.layers * self.hidden**2 + (self.vocab + self.sequence) * self.hidden


@dataclass(frozen=True)
class Cluster:
    """Devices and links. Defaults: A100-40GB-class devices, NVLink inside a node, 100 Gb/s between nodes."""

    devices: int = 64
    flops: float = 100e12            # sustained FLOP/s per device (about a third of A100 fp16 peak)
    memory: float = 40 * 2**30
    tp_bandwidth: float = 150e9      # bytes/s, intra-node
    pp_bandwidth: float = 12.5e9     # bytes/s, inter-node
    dp_bandwidth: float = 12.5e9
    latency: float = 10e-6


@dataclass(frozen=True)
class Layout:
    dp: int
    pp: int
    tp: int
    micro_batch: int
    global_batch: int
    subtensor_chunks: int = 2

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.dp * self.micro_batch)


#: Megatron-style GPT configs for the paper's sizes, with the 64-device layouts used for the README table.
PRESETS: dict[str, tuple[ModelConfig, Layout]] = {
    "gpt-1.5b": (ModelConfig(48, 1600, 25), Layout(dp=8, pp=4, tp=2, micro_batch=4, global_batch=512)),
    "gpt-2.5b": (ModelConfig(54, 1920, 20), Layout(dp=8, pp=4, tp=2, micro_batch=4, global_batch=512)),
    "gpt-8.3b": (ModelConfig(72, 3072, 32), Layout(dp=4, pp=4, tp=4, micro_batch=4, global_batch=512)),
    "gpt-20b": (ModelConfig(44, 6144, 64), Layout(dp=2, pp=8, tp=4, micro_batch=2, global_batch=512)),
}

HALF = 2  # bytes per fp16/bf16 value


def _ring(nbytes: float, group: int, bandwidth: float, latency: float) -> float:
    return 0.0 if group <= 1 else 2 * (group - 1) / group * nbytes / bandwidth + 2 * (group - 1) * latency


def stage_costs(model: ModelConfig, layout: Layout, cluster: Cluster, *, subtensor: bool) -> list[StageCosts]:
    """Per-stage costs of one micro-batch (full activations; ratios are set later)."""
    b, s, h, t = layout.micro_batch, model.sequence, model.hidden, layout.tp
    layer_fwd = (24 * b * s * h**2 + 4 * b * s**2 * h) / t / cluster.flops
    act_bytes = b * s * h * HALF
    allreduce = 2 * _ring(act_bytes, t, cluster.tp_bandwidth, cluster.latency)   # two per layer per direction
    if subtensor and layout.subtensor_chunks > 1 and t > 1:
        k = layout.subtensor_chunks
        allreduce_f = allreduce / k + max(0.0, allreduce * (k - 1) / k - layer_fwd * (k - 1) / k)
        allreduce_b = allreduce / k + max(0.0, allreduce * (k - 1) / k - 2 * layer_fwd * (k - 1) / k)
    else:
        allreduce_f = allreduce_b = allreduce
    layer_act = s * b * h * (10 + 24 / t + 5 * model.heads * s / (h * t))
    per_stage = [model.layers // layout.pp + (1 if i >= layout.pp - model.layers % layout.pp else 0)
                 for i in range(layout.pp)]
    costs = []
    for i, n in enumerate(per_stage):
        fwd = n * (layer_fwd + allreduce_f)
        bwd = n * (2 * layer_fwd + allreduce_b)
        params = 12 * n * h**2 / t
        if i == layout.pp - 1:   # LM head (tied with the embedding)
            head = 2 * b * s * h * model.vocab / t / cluster.flops
            fwd, bwd = fwd + head, bwd + 2 * head
        if i == 0 or i == layout.pp - 1:
            params += model.vocab * h / t
        costs.append(StageCosts(forward=fwd, backward=bwd, activation_bytes=n * layer_act,
                                input_bytes=n * act_bytes, static_bytes=16 * params))
    return costs


@dataclass(frozen=True)
class Projection:
    """Predicted step times (seconds) and per-stage peaks (bytes, static included)."""

    merak_step: float
    baseline_step: float
    merak_ratios: tuple[float, ...]
    merak_peak: tuple[float, ...]
    baseline_peak: tuple[float, ...]
    dp_allreduce: float
    no_recompute_step: float          # plain 1F1B without recomputation, for reference
    no_recompute_fits: bool
    merak_timeline: tuple = field(default=(), repr=False)

    @property
    def speedup(self) -> float:
        return self.baseline_step / self.merak_step


def project(model: ModelConfig, layout: Layout, cluster: Cluster) -> Projection:
    """Step time of Merak's combination vs 1F1B + full recomputation, same layout and cluster."""
    if layout.dp * layout.pp * layout.tp != cluster.devices:
        raise ValueError(f"dp x pp x tp = {layout.dp}x{layout.pp}x{layout.tp} = "
                         f"{layout.dp * layout.pp * layout.tp} does not use the {cluster.devices} devices.")
    if layout.microbatches < 1 or layout.global_batch % (layout.dp * layout.micro_batch):
        raise ValueError(f"global batch {layout.global_batch} is not a multiple of dp x micro-batch = "
                         f"{layout.dp * layout.micro_batch}.")
    link = LinkCosts(latency=cluster.latency, bandwidth=cluster.pp_bandwidth)
    budget = 0.9 * cluster.memory
    grads = max(c.static_bytes for c in stage_costs(model, layout, cluster, subtensor=False)) / 16 * HALF
    dp_time = _ring(grads, layout.dp, cluster.dp_bandwidth, cluster.latency)

    base_costs = [replace(c, recompute_ratio=1.0) for c in stage_costs(model, layout, cluster, subtensor=False)]
    base = simulate(make_schedule("1f1b", layout.pp, layout.microbatches), base_costs, link)

    merak_sched = make_schedule("shifted_critical_path", layout.pp, layout.microbatches)
    merak_costs = stage_costs(model, layout, cluster, subtensor=True)
    n_layers = max(1, model.layers // layout.pp)
    ratios = ratios_for_budget(merak_sched, merak_costs, budget, link=link, layers_per_stage=n_layers)
    merak = simulate(merak_sched, with_ratios(merak_costs, ratios), link)
    plain = simulate(make_schedule("1f1b", layout.pp, layout.microbatches),
                     stage_costs(model, layout, cluster, subtensor=False), link)
    static = [c.static_bytes for c in base_costs]
    plain_fits = all(p + s <= budget for p, s in zip(plain.peak_memory, static, strict=True))
    return Projection(merak.makespan + dp_time, base.makespan + dp_time, tuple(ratios),
                      tuple(p + s for p, s in zip(merak.peak_memory, static, strict=True)),
                      tuple(p + s for p, s in zip(base.peak_memory, static, strict=True)), dp_time,
                      plain.makespan + dp_time, plain_fits, merak.timeline)


def _bytes_arg(text: str) -> float:
    """``"40GiB"``, ``"24GB"``, ``"1.5e10"`` -> bytes (the strategy's own parser, so both accept the same)."""
    return float(parse_bytes(text, "--memory"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-merak simulate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(PRESETS), action="append",
                   help="preset GPT config and 64-device layout (repeatable); default: all four")
    for name in ("layers", "hidden", "heads", "sequence", "vocab"):
        p.add_argument(f"--{name}", type=int, help=f"override the model's {name}")
    for name in ("dp", "pp", "tp", "micro-batch", "global-batch", "subtensor-chunks"):
        p.add_argument(f"--{name}", type=int, help=f"override the layout's {name}")
    d = Cluster()
    p.add_argument("--devices", type=int, default=d.devices)
    p.add_argument("--flops", type=float, default=d.flops, help="sustained FLOP/s per device (default %(default)g)")
    p.add_argument("--memory", type=_bytes_arg, default=d.memory, help="per device, e.g. 32GiB (default 40GiB)")
    p.add_argument("--tp-bandwidth", type=float, default=d.tp_bandwidth, help="bytes/s (default %(default)g)")
    p.add_argument("--pp-bandwidth", type=float, default=d.pp_bandwidth, help="bytes/s (default %(default)g)")
    p.add_argument("--dp-bandwidth", type=float, default=d.dp_bandwidth, help="bytes/s (default %(default)g)")
    p.add_argument("--latency", type=float, default=d.latency, help="seconds per message (default %(default)g)")
    p.add_argument("--verbose", action="store_true", help="print the inputs and per-stage ratios and peaks")
    p.add_argument("--trace", help="write the first model's simulated Merak step as Chrome-trace JSON (Perfetto)")
    p.add_argument("--gantt", help="write the first model's simulated Merak step as a PNG (needs matplotlib)")
    return p


def main_simulate(argv: list[str] | None = None) -> int:
    """Print the projected step times; returns the exit code."""
    args = _parser().parse_args(argv)
    cluster = Cluster(args.devices, args.flops, args.memory, args.tp_bandwidth, args.pp_bandwidth,
                      args.dp_bandwidth, args.latency)
    names = args.model or list(PRESETS)
    print(f"{'model':<10} {'params':>7} {'dp,pp,tp':>9} {'mb x m':>7} {'1f1b+full (s)':>14} {'merak (s)':>10} "
          f"{'speedup':>8} {'1f1b none (s)':>14}  stage-aware ratios")
    status = 0
    for name in names:
        model, layout = PRESETS[name]
        model = replace(model, **{k: getattr(args, k) for k in ("layers", "hidden", "heads", "sequence", "vocab")
                                  if getattr(args, k) is not None})
        over = {"dp": args.dp, "pp": args.pp, "tp": args.tp, "micro_batch": args.micro_batch,
                "global_batch": args.global_batch, "subtensor_chunks": args.subtensor_chunks}
        layout = replace(layout, **{k: v for k, v in over.items() if v is not None})
        try:
            proj = project(model, layout, cluster)
        except (ValueError, MemoryBudgetError) as err:
            print(f"{name:<10} error: {err}")
            status = 1
            continue
        print(f"{name:<10} {model.parameters / 1e9:>6.2f}B {f'{layout.dp},{layout.pp},{layout.tp}':>9} "
              f"{f'{layout.micro_batch}x{layout.microbatches}':>7} {proj.baseline_step:>14.3f} "
              f"{proj.merak_step:>10.3f} {proj.speedup:>7.2f}x "
              f"{f'{proj.no_recompute_step:.3f}' if proj.no_recompute_fits else 'OOM':>14}  "
              f"{[round(r, 2) for r in proj.merak_ratios]}")
        if args.trace and name == names[0]:
            from lightning_merak.pipeline.plan.timeline import write_chrome_trace

            print(f"{'':<10} trace: {write_chrome_trace(proj.merak_timeline, args.trace, name=name)}")
        if args.gantt and name == names[0]:
            from lightning_merak.pipeline.plan.timeline import plot_gantt

            print(f"{'':<10} gantt: {plot_gantt(proj.merak_timeline, args.gantt, title=f'{name}: shifted critical path')}")
        if args.verbose:
            gib = [round(p / 2**30, 1) for p in proj.merak_peak]
            base = [round(p / 2**30, 1) for p in proj.baseline_peak]
            print(f"{'':<10} {model}, {layout}\n{'':<10} peak GiB merak {gib}, baseline {base}; "
                  f"DP all-reduce {proj.dp_allreduce:.3f} s")
    if args.verbose:
        print(f"cluster: {cluster}")
    return status
