"""Compose the parallelisms for this rank, in order (torchtitan style): find the pipelined module, take
example inputs from the first batch, cut it into stages (pipeline), shard layers (tensor parallel), wrap
recomputation (stage-aware), attach the memory manager (DELTA). One function per step; the order is here.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_merak._compat import BATCH_NORM_TYPES, TrainerFn, dataloader_for
from lightning_merak.pipeline.takeover import PipelineInputError, capture_model_call, split_batch

log = logging.getLogger(__name__)

STEP_FOR = {TrainerFn.FITTING: "training_step", TrainerFn.VALIDATING: "validation_step",
            TrainerFn.TESTING: "test_step", TrainerFn.PREDICTING: "predict_step"}


def find_pipelined_module(lightning_module: nn.Module, path: str) -> tuple[str, nn.Module]:
    """The submodule to pipeline: ``path`` if given, else the direct child holding most parameters."""
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
    return max(children, key=lambda nc: sum(p.numel() for p in nc[1].parameters()))


def example_inputs(strategy: Any, trainer: Any, pipelined: nn.Module, num_microbatches: int) -> tuple[tuple, dict]:
    """The pipelined module's arguments for one micro-batch of the first batch of the running loop.

    The RNG state is restored afterwards, so drawing this batch does not shift the run's randomness.
    """
    lightning_module = strategy.lightning_module
    states = (torch.get_rng_state(), random.getstate())
    try:
        loaders = dataloader_for(trainer)
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        if isinstance(loader, dict):
            loader = next(iter(loader.values()))
        batch = next(iter(loader))
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
    batch = strategy.batch_to_device(batch)
    micro = split_batch(batch, num_microbatches)[0] if STEP_FOR[trainer.state.fn] == "training_step" else batch
    step = getattr(lightning_module, STEP_FOR[trainer.state.fn])
    return capture_model_call(step, pipelined, lightning_module, micro, 0)


def build_engine(strategy: Any, trainer: Any) -> tuple[Any, Any]:
    """Everything that makes this rank's piece of the model, in order. Returns the pipeline engine the strategy
    delegates steps to (None without a pipeline) and the DELTA memory manager (None without one)."""
    config = strategy.config
    dp, pp, tp = strategy.sizes
    mesh = strategy.device_mesh
    lightning_module = strategy.lightning_module
    path, pipelined = find_pipelined_module(lightning_module, config.pipeline_module)
    num_microbatches = config.microbatches(pp)
    example = example_inputs(strategy, trainer, pipelined, num_microbatches)
    warn_batch_coupled(pipelined, pp)

    stages, plan, tied, placement = [], None, [], ()
    tp_plan = tensor_parallel_plan(pipelined, example, tp) if tp > 1 else None  # on the whole module
    if pp > 1:
        placement = stage_placement(config.pipeline_schedule, pp, num_microbatches)
        stages, plan = apply_pipeline(pipelined, example, placement, mesh["pp"].get_local_rank(), config.partition)
        tied = tied_parameter_groups(lightning_module, path, plan, mesh, placement)
    if tp_plan is not None:
        apply_tp(pipelined, tp_plan, mesh, config.subtensor_chunks)
    schedule_name, ratios, auto = config.pipeline_schedule, None, None
    if pp > 1:
        schedule_name, ratios = choose_schedule_and_recompute(plan, config, pp, num_microbatches)
        auto = MeasuredChoice(plan, config, num_microbatches, stages, ratios)
        auto.apply(ratios)
        auto = auto if config.pipeline_schedule == "auto" else None
    delta = apply_memory_manager(pipelined, config) if config.memory_manager == "delta" else None
    if plan is not None:
        where = "" if len(placement) == pp else f" (pipeline rank of each stage: {list(placement)})"
        rank_zero_info(f"Merak partition of `{path}` ({type(pipelined).__name__}) into {len(placement)} stages"
                       f"{where}:\n{plan.table()}\nschedule {schedule_name}, {num_microbatches} micro-batches, "
                       f"recompute ratio per stage {[round(r, 3) for r in ratios]}")
    engine = None
    if pp > 1:
        from lightning_merak.pipeline.engine import PipelineEngine

        # Merak's pre-checkpointed cool-down forwards are recomputation too: none of it with recompute="none"
        table = () if config.recompute == "none" else None
        engine = PipelineEngine(strategy, lightning_module, pipelined, stages, schedule_name, num_microbatches,
                                tied, placement, delta, recompute_table=table, auto=auto)
    return engine, delta


def apply_memory_manager(pipelined: nn.Module, config: Any) -> Any:
    """DELTA over this rank's part of the module (after pruning: only owned blocks become segments)."""
    from lightning_merak.memory import DeltaScheduler

    budget = config.budget_bytes
    if budget is None:  # e.g. strategy="merak_delta": fit the device, unsupervised
        device = next((p.device for p in pipelined.parameters()), torch.device("cpu"))
        budget = int(DEFAULT_BUDGET_SHARE * device_memory(device))
        log.warning(f"Merak: memory_budget not set; DELTA keeps parameters, gradients and saved activations within "
                    f"{DEFAULT_BUDGET_SHARE:.0%} of this device's memory ({budget / 2**30:.2f} GiB). Set "
                    "memory_budget to choose.")
    return DeltaScheduler(pipelined, budget)


DEFAULT_BUDGET_SHARE = 0.75  # the rest: optimizer state, temporaries, allocator fragmentation


def device_memory(device: torch.device) -> int:
    """Bytes of memory one process may use: a GPU's total, or the host's RAM shared by the local processes."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import os

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(local, 1)


def stage_placement(schedule: str, pp: int, num_microbatches: int) -> tuple[int, ...]:
    """The pipeline rank of each stage: one stage per rank, or two (interleaved: 0..p−1, 0..p−1; V: 0..p−1,
    p−1..0) for the schedules that place two."""
    from lightning_merak.pipeline.schedules import MULTI_STAGE_SCHEDULES, make_schedule

    if schedule in MULTI_STAGE_SCHEDULES:
        return tuple(make_schedule(schedule, pp, num_microbatches).stage_to_rank)
    return tuple(range(pp))


def apply_pipeline(pipelined: nn.Module, example: tuple[tuple, dict], placement: tuple[int, ...], pp_rank: int,
                   partition: Any) -> tuple[list[nn.Module], Any]:
    """Plan stages on the proxy graph (same plan on every rank: it is deterministic) and keep this rank's."""
    from lightning_merak.partition import PartitionError, plan_model
    from lightning_merak.pipeline.stage import build_stages

    try:
        plan = plan_model(pipelined, example, len(placement), partition=partition)
    except PartitionError as err:
        if len(placement) == len(set(placement)):
            raise
        from lightning_merak.config import MerakConfigError

        raise MerakConfigError(f"this pipeline schedule places two stages on each pipeline rank, so "
                               f"{type(pipelined).__name__} must be cut into {len(placement)} stages: {err}") from err
    return build_stages(pipelined, plan, [s for s, r in enumerate(placement) if r == pp_rank]), plan


def tensor_parallel_plan(pipelined: nn.Module, example: tuple[tuple, dict], tp: int) -> Any:
    """Which module gets which TP style, detected on the whole module before any stage is cut out of it."""
    from lightning_merak.tensor_parallel import tp_plan_for

    tp_plan = tp_plan_for(pipelined, tp, example)
    rank_zero_info(f"Merak tensor-parallel plan:\n{tp_plan.table()}")
    return tp_plan


def apply_tp(pipelined: nn.Module, tp_plan: Any, mesh: Any, chunks: int) -> None:
    from lightning_merak.tensor_parallel import apply_tensor_parallel

    apply_tensor_parallel(pipelined, mesh["tp"], tp_plan, subtensor_chunks=chunks)


def choose_schedule_and_recompute(plan: Any, config: Any, pp: int, num_microbatches: int
                                  ) -> tuple[str, list[float]]:
    """The schedule ("auto": the best simulated one that fits the budget, with its reason logged) and the
    per-stage recompute ratios (Merak's stage-aware formula, or the least that fits ``memory_budget``)."""
    from lightning_merak.pipeline.recompute import resolve_ratios
    from lightning_merak.pipeline.schedules import make_schedule
    from lightning_merak.pipeline.simulate import choose_schedule

    costs = plan.stage_costs()
    layers = max(len(s.units) for s in plan.stages)
    # With DELTA, the memory manager decides per block (keep, swap or recompute) against each stage's budget,
    # counting the micro-batches the schedule keeps in flight; checkpointing on top would recompute twice.
    recompute = "none" if config.memory_manager == "delta" else config.recompute
    budget = None if config.memory_manager == "delta" else config.budget_bytes
    if config.pipeline_schedule == "auto":
        choice = choose_schedule(costs, num_microbatches, memory_budget=budget, recompute=recompute,
                                 candidates=SINGLE_STAGE_SCHEDULES)
        rank_zero_info(f"Merak pipeline_schedule='auto' chose {choice.reason}")
        return choice.name, list(choice.ratios)
    schedule = make_schedule(config.pipeline_schedule, pp, num_microbatches)
    ratios = resolve_ratios(recompute, schedule, costs, budget, layers_per_stage=layers)
    return config.pipeline_schedule, ratios


SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b", "shifted_critical_path")


class MeasuredChoice:
    """``pipeline_schedule="auto"`` after the first steps: the choice again, from measured compute times.

    The start-up choice uses modelled costs (FLOPs as time). Once a step has run, ``choose`` re-simulates every
    candidate with each stage's measured forward and backward times (``simulate.measured_costs``) and the same
    memory budget; ``apply`` sets this rank's recompute ratio (the engine rebuilds its schedules).
    """

    def __init__(self, plan: Any, config: Any, num_microbatches: int, stages: list[Any], ratios: list[float]) -> None:
        self.plan, self.config, self.num_microbatches = plan, config, num_microbatches
        self.stages = stages  # this rank's StageModules
        self.ratios = list(ratios)

    def choose(self, events: list[dict]) -> Any:
        from lightning_merak.pipeline.simulate import choose_schedule, measured_costs

        costs = measured_costs(events, self.plan.stage_costs(), self.ratios)
        recompute = "none" if self.config.memory_manager == "delta" else self.config.recompute
        budget = None if self.config.memory_manager == "delta" else self.config.budget_bytes
        return choose_schedule(costs, self.num_microbatches, memory_budget=budget, recompute=recompute,
                               candidates=SINGLE_STAGE_SCHEDULES)

    def apply(self, ratios: list[float]) -> None:
        """Checkpoint the share ``ratios[stage]`` of each local stage's blocks (rounded up to whole blocks)."""
        self.ratios = list(ratios)
        for stage in self.stages:
            owned = len(self.plan.stages[stage.stage_index].units)
            stage.checkpoint_units(math.ceil(self.ratios[stage.stage_index] * owned - 1e-9))


def tied_parameter_groups(lightning_module: nn.Module, path: str, plan: Any, mesh: Any, placement: tuple[int, ...]
                          ) -> list[tuple[Any, list, bool]]:
    """Process groups joining the pipeline ranks that hold copies of one tied weight (e.g. GPT-2's wte/lm_head),
    this rank's copies, and whether this rank's copy is the one a global gradient norm counts (the first
    stage's). Stages of one tie on the same rank share one parameter there: nothing to join."""
    groups = []
    my_rank = mesh["pp"].get_local_rank()
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
                g = dist.new_group(members)
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


def warn_batch_coupled(pipelined: nn.Module, pp: int) -> None:
    """A pipeline shows modules micro-batches, not the batch: warn once for layers that couple samples."""
    if pp <= 1:
        return
    for name, module in pipelined.named_modules():
        if isinstance(module, BATCH_NORM_TYPES) and module.training:
            rank_zero_info(f"Merak: `{name}` ({type(module).__name__}) normalises over a batch; under the pipeline it "
                           "sees micro-batches, so results equal gradient accumulation over micro-batches, not one "
                           "full-batch step (see README, batch-coupled computations).")
            return

