"""The build recipe: this rank's piece of the model and the engine that runs it, top to bottom.

``build_engine`` reads in order (torchtitan style, one function per step, each gated once):

1. find the pipelined module, and materialise what lies outside it (replicated on every rank);
2. example inputs: the pipelined module's arguments for one micro-batch of the first batch;
3. tensor-parallel plan, detected on a meta twin of the whole module (which layer feeds which needs the flow);
4. cut: plan the stages on the proxy graph and prune this rank's copy to its stages;
5. apply TP to what the cut left, still on meta for a meta-built model (only local weights are sharded);
6. materialise: only this rank's tensors get memory on its device (``materialize``), of a TP-sharded weight only
   its shard (read as a slice, or initialised into the shard); tied copies made equal;
7. schedule and recompute: ``AutoSchedule`` decides, the stages checkpoint their share;
8. memory manager (DELTA) over what is left;
9. RNG streams;
10. the engine: ``PipelineEngine`` for pp > 1, ``LocalEngine`` otherwise.

Nothing moves to the device before step 6, so no rank ever holds another stage's weights there, nor another TP
rank's part of a weight; a model built on the meta device (``configure_model``, ``init_module(empty_init=True)``)
is planned and sharded on meta. Inputs are explicit
(module, first batch, config, mesh, device); nothing here holds the strategy or the Trainer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_merak import topology
from lightning_merak._compat import BATCH_NORM_TYPES, local_shard, tree_map
from lightning_merak.config import MerakConfig, MerakConfigError
from lightning_merak.materialize import materialize
from lightning_merak.pipeline.takeover import PipelineInputError, capture_model_call, split_batch
from lightning_merak.units import format_bytes

log = logging.getLogger(__name__)

ASSUMED_OPTIMIZER_STATES = 2.0  # Adam's two moments: the common case, where the optimizer cannot be measured
DEFAULT_BUDGET_SHARE = 0.75  # the rest: optimizer state, temporaries, allocator fragmentation


def build_engine(lightning_module: Any, batch: Any, step_name: str, config: MerakConfig, mesh: Any,
                 device: torch.device, timeout: timedelta | None = None,
                 optimizer_states: float | None = None) -> Any:
    """Everything that makes this rank's piece of the model, in order; returns the engine for its steps.

    ``batch`` is the first batch of the running loop, already on ``device``; ``step_name`` the hook it feeds
    (``training_step``, ``validation_step``, ...); ``timeout``: for the process groups made here (tied weights);
    ``optimizer_states``: weight-sized optimizer tensors per parameter per rank, for a cut that must fit
    ``memory_budget`` (None: unknown, Adam's two assumed).
    """
    pp, tp = topology.size(mesh, "pp"), topology.size(mesh, "tp")
    check_step_supported(lightning_module, pp)
    calls = first_step_call(lightning_module, batch, step_name, config.microbatches(pp)) if pp > 1 else None
    path, pipelined = find_pipelined_module(lightning_module, config.pipeline_module, calls)
    seed = init_seed()
    full_bytes = sum(p.numel() * p.element_size() for p in lightning_module.parameters())
    outside = materialize(lightning_module, device, seed, skip=pipelined)
    num_microbatches = config.microbatches(pp)
    example = example_inputs(lightning_module, pipelined, batch, step_name, num_microbatches)
    warn_batch_coupled(pipelined, pp, num_microbatches)
    tp_plan = tensor_parallel_plan(pipelined, example, tp) if tp > 1 else None
    cut = (cut_pipeline(lightning_module, path, pipelined, example, config, mesh, device, tp_plan,
                        ASSUMED_OPTIMIZER_STATES if optimizer_states is None else optimizer_states)
           if pp > 1 else None)
    if tp_plan is not None:  # before materialising: a meta-built weight gets memory for its shard only
        apply_tp(pipelined, tp_plan, mesh, config.subtensor_chunks)
    local = materialize(pipelined, device, seed, prefix=path)
    forget_checkpoints(lightning_module)
    held = sum(local_shard(t).numel() * t.element_size()
               for t in [*lightning_module.parameters(), *lightning_module.buffers()])
    report_materialized(held, full_bytes, local.initialized_bytes > 0, len(outside.read_keys) + len(local.read_keys))
    if cut is not None:  # after TP: the groups hold the parameters the optimizer will see (DTensors under TP)
        cut.tied = tied_parameter_groups(lightning_module, path, cut.plan, mesh, cut.placement, timeout)
        equalize_tied_copies(cut.tied)
    auto = choose_schedule(cut, config, pp, num_microbatches) if cut is not None else None
    delta = apply_memory_manager(pipelined, config) if config.memory_manager == "delta" else None
    rng = step_rng(lightning_module, pipelined, mesh, device, config.rng, seed)
    if cut is None:
        from lightning_merak.pipeline.engine import LocalEngine

        return LocalEngine(lightning_module, delta=delta, rng=rng)
    from lightning_merak.pipeline.engine import PipelineEngine

    return PipelineEngine(lightning_module, pipelined, cut.stages, pp_group=topology.group(mesh, "pp"),
                          device=device, num_microbatches=num_microbatches, stage_to_rank=cut.placement, auto=auto,
                          schedule_name=auto.decision.name, tied_groups=cut.tied, delta=delta, rng=rng,
                          pre_checkpoint=config.recompute != "none", trace_dir=config.trace_dir,
                          batch_loss=config.batch_loss)


# ---------------------------------------------------------------------------------------------- 1, 2
def check_step_supported(lightning_module: Any, pp: int) -> None:
    """What a pipeline cannot run, refused before any work."""
    if pp > 1 and not getattr(lightning_module, "automatic_optimization", True):
        raise MerakConfigError(
            f"{type(lightning_module).__name__} uses manual optimization (automatic_optimization = False), which "
            "pipeline_parallel_size > 1 does not support: the pipeline schedule runs the forward and backward of "
            "every micro-batch itself, so manual_backward() and optimizer.step() inside training_step cannot take "
            "part. Use automatic optimization, or pipeline_parallel_size=1 (data and tensor parallelism support "
            "manual optimization)."
        )


def find_pipelined_module(lightning_module: nn.Module, path: str,
                          step_call: Callable[[nn.Module], bool] | None = None) -> tuple[str, nn.Module]:
    """The module to pipeline (``""``: the LightningModule itself). ``path`` if given; for "auto", the direct
    child holding most (over half) of the parameters, so that little is replicated outside the pipeline. Under a
    pipeline (``step_call(module)``: whether the user's step calls ``module``), where no child does (a two-tower
    model: each tower about half), the LightningModule itself when the step reaches them through ``self(...)``;
    otherwise the largest child, with a warning naming what stays replicated and the fix. Without ``step_call``
    (no pipeline), the largest child."""
    if path != "auto":
        try:
            return path, lightning_module.get_submodule(path)
        except AttributeError:
            raise PipelineInputError(f"pipeline_module={path!r} is not a submodule of "
                                     f"{type(lightning_module).__name__}.") from None
    children = [(name, child) for name, child in lightning_module.named_children()
                if any(True for _ in child.parameters())]
    if not children:
        raise PipelineInputError(f"{type(lightning_module).__name__} has no submodule with parameters to pipeline.")
    total = _count(lightning_module)
    name, child = max(children, key=lambda nc: _count(nc[1]))
    if 2 * _count(child) > total or step_call is None:
        return name, child
    if step_call(lightning_module):
        return "", lightning_module
    rank_zero_warn(f"Merak pipeline_module='auto': no submodule of {type(lightning_module).__name__} holds most of "
                   f"its parameters (the largest, `{name}`, holds {_count(child) / total:.0%}) and the step does not "
                   f"call self(...), so only `{name}` is pipelined and the rest is replicated on every pipeline rank. "
                   "Call the model through self(...) (a forward that runs every tower) to pipeline all of it, or set "
                   "MerakStrategy(pipeline_module=...) to the module your step calls.")
    return name, child


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def first_step_call(lightning_module: Any, batch: Any, step_name: str,
                    num_microbatches: int) -> Callable[[nn.Module], bool]:
    """Whether the user's step, run on (a micro-batch of) the first batch up to the call, calls ``module``."""
    def calls(module: nn.Module) -> bool:
        try:
            example_inputs(lightning_module, module, batch, step_name, num_microbatches)
        except PipelineInputError:
            return False
        return True
    return calls


def init_seed() -> int:
    """One seed on every rank for the init of meta-built modules (Lightning's seed, else torch's)."""
    seed = [int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))]
    if dist.is_initialized():
        dist.broadcast_object_list(seed, src=0)
    return seed[0]


def report_materialized(local_bytes: int, full_bytes: int, initialized: bool, read: int) -> None:
    """Log the parameter and buffer bytes every rank holds on its device (its TP shards) against the whole model's
    parameters."""
    per_rank = [(local_bytes, read)]
    if dist.is_initialized():
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, (local_bytes, read))
    how = "built on the meta device" if initialized else "built eagerly, cut first"
    reads = f"; tensors read from the pretrained folder per rank: {[r for _, r in per_rank]}" if read else ""
    rank_zero_info(f"Merak materialised per rank ({how}): " + ", ".join(format_bytes(b) for b, _ in per_rank)
                   + f" of the model's {format_bytes(full_bytes)} of parameters{reads}")


def forget_checkpoints(module: nn.Module) -> None:
    """Close the pretrained folders read during materialisation (``pretrained.lazy_from_pretrained``)."""
    from lightning_merak.pretrained import forget

    for sub in module.modules():
        forget(sub)


def example_inputs(lightning_module: Any, pipelined: nn.Module, batch: Any, step_name: str,
                   num_microbatches: int) -> tuple[tuple, dict]:
    """The pipelined module's arguments for one micro-batch of ``batch`` (the whole batch when nothing is split:
    one micro-batch, or an evaluation step)."""
    micro = batch
    if step_name == "training_step" and num_microbatches > 1:
        micro = split_batch(batch, num_microbatches)[0]
    return capture_model_call(getattr(lightning_module, step_name), pipelined, lightning_module, micro, 0, quiet=True)


def warn_batch_coupled(pipelined: nn.Module, pp: int, num_microbatches: int) -> None:
    """A pipeline shows its blocks micro-batches, not the batch: a layer that couples the samples inside a block
    cannot equal one process (a loss that does is computed over the whole batch: ``batch_loss``)."""
    if pp <= 1 or num_microbatches <= 1:
        return
    names = [f"`{name}` ({type(module).__name__})" for name, module in pipelined.named_modules()
             if isinstance(module, BATCH_NORM_TYPES) and module.training]
    if names:
        rank_zero_warn(f"Merak: {', '.join(names[:3])}{' and more' if len(names) > 3 else ''} normalise over the "
                       f"batch; inside the pipeline they see micro-batches of 1/{num_microbatches} of it, so training "
                       "differs from one process (it equals gradient accumulation over the micro-batches). Use "
                       "num_microbatches=1, or GroupNorm/LayerNorm, for one process's results.")


# ---------------------------------------------------------------------------------------------- 3, 5
def tensor_parallel_plan(pipelined: nn.Module, example: tuple[tuple, dict], tp: int) -> Any:
    """Which module gets which TP style, detected on the whole module before any stage is cut out of it."""
    from lightning_merak.tensor_parallel import tp_plan_for
    from lightning_merak.trace import meta_twin

    # on a twin: the module may be meta-built, or on the CPU while the example is on the device. A meta twin
    # needs no memory; where the model's code needs real values (BERT's mask check), a zero-weight CPU twin runs
    # instead, as for the proxy capture
    def on(device: str) -> tuple[tuple, dict]:
        return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, example)

    try:
        tp_plan = tp_plan_for(meta_twin(pipelined), tp, on("meta"))
    except Exception:  # noqa: BLE001 - any failure on meta: the zero-weight twin shows the real error, if any
        tp_plan = tp_plan_for(meta_twin(pipelined, "cpu"), tp, on("cpu"))
    rank_zero_info(f"Merak tensor-parallel plan:\n{tp_plan.table()}")
    return tp_plan


def apply_tp(pipelined: nn.Module, tp_plan: Any, mesh: Any, chunks: int) -> None:
    from lightning_merak.tensor_parallel import apply_tensor_parallel

    apply_tensor_parallel(pipelined, mesh["tp"], tp_plan, subtensor_chunks=chunks)


# ---------------------------------------------------------------------------------------------- 4
@dataclass
class PipelineCut:
    """The partition and what this rank keeps of it."""

    plan: Any  # PartitionPlan over every stage
    placement: tuple[int, ...]  # pipeline rank of each stage
    stages: list[Any]  # this rank's StageModules, in stage order
    tied: list[tuple[Any, list, bool]]  # tied-weight groups (see tied_parameter_groups), once materialised
    auto: Any = None  # the AutoSchedule that decided the placement (and the schedule) before the cut


def cut_pipeline(lightning_module: nn.Module, path: str, pipelined: nn.Module, example: tuple[tuple, dict],
                 config: MerakConfig, mesh: Any, device: torch.device, tp_plan: Any = None,
                 optimizer_states: float = ASSUMED_OPTIMIZER_STATES) -> PipelineCut:
    """Plan the stages on the proxy graph (the same plan on every rank: it is deterministic); keep this rank's.

    The placement, one or two stages per rank, is decided before anything is cut: a p-stage partition and, for
    "auto" where the model has the blocks, a 2p-stage one are planned, every candidate schedule is simulated
    on its own partition's modelled costs (``AutoSchedule``), and the winner's partition is the one cut. Under
    a ``memory_budget`` the cut fits every stage in it (bytes per TP rank under ``tp_plan``).
    """
    from lightning_merak.partition import PartitionError
    from lightning_merak.pipeline.plan.choose import AutoSchedule
    from lightning_merak.pipeline.plan.schedules import make_schedule, spec
    from lightning_merak.pipeline.stage import build_stages

    pp = topology.size(mesh, "pp")
    num_microbatches = config.microbatches(pp)
    plans: dict[int, Any] = {}
    for per_rank in config.placements:
        # the cut depends only on the stage count; which rank holds which stage comes with the chosen schedule
        ranks = tuple(range(pp)) * per_rank if config.pipeline_schedule == "auto" else make_schedule(
            config.pipeline_schedule, pp, num_microbatches).stage_to_rank
        try:
            plans[per_rank] = plan_stages(pipelined, example, ranks, config.partition, config.budget_bytes, tp_plan,
                                          memory_manager=config.memory_manager, num_microbatches=num_microbatches,
                                          optimizer_states=optimizer_states)
        except (PartitionError, MerakConfigError) as err:
            if config.pipeline_schedule != "auto" or per_rank == 1:
                raise
            rank_zero_info(f"Merak pipeline_schedule='auto': no {pp * per_rank}-stage partition of `{path}`, so only "
                           f"one stage per rank is considered ({err})")
    candidates = [n for n in config.schedule_candidates() if spec(n).stages_per_rank in plans]
    first = plans[min(plans)]
    auto = AutoSchedule(config.pipeline_schedule, config.recompute, config.budget_bytes, pp, num_microbatches,
                        {k: plan.stage_costs() for k, plan in plans.items()}, candidates=candidates,
                        layers_per_stage=max(len(s.units) for s in first.stages),
                        memory_managed=config.memory_manager == "delta", pre_checkpoint=config.recompute != "none",
                        blocks={k: [len(s.units) for s in plan.stages] for k, plan in plans.items()})
    plan = plans[auto.stages_per_rank]
    placement = make_schedule(auto.decision.name, pp, num_microbatches).stage_to_rank
    pp_rank = topology.local_rank(mesh, "pp")
    shares = parameter_shares(lightning_module, pipelined, plan)  # before the cut prunes the stages
    stages = build_stages(pipelined, plan, [s for s, r in enumerate(placement) if r == pp_rank], device)
    where = "" if len(placement) == pp else f" (pipeline rank of each stage: {list(placement)})"
    what = f"`{path}`" if path else "the LightningModule itself"
    rank_zero_info(f"Merak partition of {what} ({type(pipelined).__name__}) into {len(placement)} stages"
                   f"{where}:\n{plan.table()}\n{shares}")
    return PipelineCut(plan, placement, stages, [], auto)


def parameter_shares(lightning_module: nn.Module, pipelined: nn.Module, plan: Any) -> str:
    """The share of the LightningModule's parameters each stage holds, and what is replicated on every pipeline
    rank outside the pipelined module (a weight tied across stages counts on each stage holding it)."""
    total = _count(lightning_module) or 1
    inside = {id(p) for p in pipelined.parameters()}
    outside: dict[str, int] = {}
    for name, p in lightning_module.named_parameters():
        if id(p) not in inside:
            outside[name.split(".")[0]] = outside.get(name.split(".")[0], 0) + p.numel()
    per_stage = ", ".join(f"stage {st.index} {st.num_params / total:.1%}" for st in plan.stages)
    replicated = sum(outside.values())
    where = f" ({', '.join(f'`{n}` {c:,}' for n, c in outside.items())})" if outside else ""
    return (f"parameters per stage, of the model's {total:,}: {per_stage}; replicated on every pipeline rank, outside "
            f"the pipeline: {replicated:,} ({replicated / total:.1%}){where}")


def plan_stages(pipelined: nn.Module, example: tuple[tuple, dict], placement: tuple[int, ...], partition: Any,
                memory_budget: int | None = None, tp_plan: Any = None, *, memory_manager: str = "none",
                num_microbatches: int | None = None, optimizer_states: float = ASSUMED_OPTIMIZER_STATES) -> Any:
    """The ``PartitionPlan`` for one stage per entry of ``placement``; a model too small for a two-stages-per-rank
    placement is a configuration error naming the schedule's need.

    ``memory_budget`` is per device: with k stages on each pipeline rank each stage gets 1/k of it (the cut is
    one programme over contiguous stages; a rank's two stages are not). ``optimizer_states``: weight-sized
    optimizer tensors per parameter (the strategy measures the user's optimizer before the cut)."""
    from lightning_merak.partition import PartitionError, plan_model

    per_rank = len(placement) // len(set(placement))
    try:
        return plan_model(pipelined, example, len(placement), partition=partition, tp_plan=tp_plan,
                          memory_budget=None if memory_budget is None else memory_budget // per_rank,
                          memory_manager=memory_manager, num_microbatches=num_microbatches,
                          optimizer_states=optimizer_states)
    except PartitionError as err:
        if len(set(placement)) == len(placement):
            raise
        raise MerakConfigError(f"this pipeline schedule places two stages on each pipeline rank, so "
                               f"{type(pipelined).__name__} must be cut into {len(placement)} stages: {err}") from err


def tied_parameter_groups(lightning_module: nn.Module, path: str, plan: Any, mesh: Any, placement: tuple[int, ...],
                          timeout: timedelta | None = None) -> list[tuple[Any, list, bool]]:
    """Process groups joining the pipeline ranks that hold copies of one tied weight (e.g. GPT-2's wte/lm_head),
    this rank's copies, and whether this rank's copy is the one a global gradient norm counts (the first
    stage's). Stages of one tie on the same rank share one parameter there: nothing to join."""
    groups = []
    my_rank = topology.local_rank(mesh, "pp")
    for tie in getattr(plan, "tied", []) or []:
        ranks = sorted({placement[s] for s in tie.stages})
        if len(ranks) < 2:
            continue
        my_group = None
        # one group per (dp, tp) coordinate: the pp ranks of that pipeline holding the tie; every rank
        # creates every group, in the same order (new_group is collective)
        full = mesh.mesh
        for d in range(full.shape[0]):
            for t in range(full.shape[2]):
                members = [int(full[d, r, t]) for r in ranks]
                g = dist.new_group(members, timeout=timeout)
                if dist.get_rank() in members:
                    my_group = g
        if my_group is not None:
            params: dict[int, nn.Parameter] = {}
            for name in tie.names:
                full_name = f"{path}.{name}" if path else name
                try:
                    param = lightning_module.get_parameter(full_name)
                except AttributeError:  # that copy lives on another stage
                    continue
                params[id(param)] = param
            groups.append((my_group, list(params.values()), my_rank == placement[min(tie.stages)]))
    return groups


def equalize_tied_copies(tied: list[tuple[Any, list, bool]]) -> None:
    """Copies of a tied weight on several pipeline ranks start equal: the first stage's copy is sent to the others
    (a meta-built model initialised each copy under its own module's seed)."""
    with torch.no_grad():
        for group, params, _ in tied:
            for p in params:
                dist.broadcast(local_shard(p), src=dist.get_global_rank(group, 0), group=group)


# ---------------------------------------------------------------------------------------------- 7
def choose_schedule(cut: PipelineCut, config: MerakConfig, pp: int, num_microbatches: int) -> Any:
    """The schedule and each stage's recompute ratio (``AutoSchedule``, decided with the cut's placement); the
    stages checkpoint their share. Logs what each stage recomputes, Merak's pre-checkpointed forwards included."""
    auto = cut.auto
    if config.pipeline_schedule == "auto":
        rank_zero_info(f"Merak pipeline_schedule='auto' chose {auto.decision.reason}")
    rank_zero_info(f"Merak schedule {auto.decision.name}, {num_microbatches} micro-batches, recompute ratio per "
                   f"stage {[round(r, 3) for r in auto.decision.ratios]}; {auto.recompute_report()}")
    return auto


# ---------------------------------------------------------------------------------------------- 8, 9
def apply_memory_manager(pipelined: nn.Module, config: MerakConfig) -> Any:
    """DELTA over this rank's part of the module (after pruning: only owned blocks become segments)."""
    from lightning_merak.memory import DeltaScheduler

    budget = config.budget_bytes
    if budget is None:  # e.g. strategy="merak_delta": fit the device, unsupervised
        device = next((p.device for p in pipelined.parameters()), torch.device("cpu"))
        budget = int(DEFAULT_BUDGET_SHARE * device_memory(device))
        log.warning(f"Merak: memory_budget not set; DELTA keeps parameters, gradients and saved activations within "
                    f"{DEFAULT_BUDGET_SHARE:.0%} of this device's memory ({budget / 2**30:.2f} GiB). Set "
                    "memory_budget to choose.")
    # every rank runs one and closes its steps with the others: a failed budget check stops all of them
    return DeltaScheduler(pipelined, budget, swap_dir=config.swap_dir,
                          group=dist.group.WORLD if dist.is_initialized() else None)


def device_memory(device: torch.device) -> int:
    """Bytes of memory one process may use: a GPU's total, or the host's RAM shared by the local processes."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(local, 1)


def step_rng(lightning_module: nn.Module, pipelined: nn.Module, mesh: Any, device: torch.device, mode: str,
             seed: int) -> Any:
    """``rng="microbatch"``: streams per micro-batch and module call (layout-invariant dropout). Otherwise, under a
    pipeline, ``StepStreams``: each micro-batch's runs of the user's step (capture, loss) draw the same numbers.
    Without a pipeline and streams: None (torch's generators as they are)."""
    from lightning_merak.rng import MicrobatchRNG, StepStreams

    data_parallel = (topology.size(mesh, "dp"), topology.local_rank(mesh, "dp"))
    if mode != "microbatch":
        return StepStreams(seed, device, data_parallel) if topology.size(mesh, "pp") > 1 else None
    # the pipelined module is entered twice on a pipeline's last stage (the user's call, then the stage's)
    return MicrobatchRNG(lightning_module, seed, device, skip=[pipelined], data_parallel=data_parallel)
