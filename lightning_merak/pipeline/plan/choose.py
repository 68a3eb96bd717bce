"""Which schedule and how much recomputation: ``pipeline_schedule`` and ``recompute`` turned into a decision.

Sits above ``simulate`` and ``recompute`` (it uses both; neither uses it). ``AutoSchedule`` is what the build
recipe asks before the first step, from the partitions' modelled costs, and, for ``pipeline_schedule="auto"``,
again after an early step from the times that step measured. Pure: no process group, no stage.

"auto" weighs every schedule, each on the costs of its own placement: one stage per rank (gpipe, 1f1b,
shifted_critical_path) on the p-stage partition, two per rank (interleaved_1f1b, zbv) on the 2p-stage one.
The placement is what the model is cut into, so it is fixed before step 1; the re-choice from measured times
stays within it. Recomputation costs real time the simulator can only approximate (its bubbles are not free on
a shared machine, and a pre-checkpointed forward runs twice), so under ``recompute="stage_aware"`` a candidate
that recomputes — ratios above 0 or Merak's pre-checkpointed cool-down forwards — is only chosen when the
memory budget leaves no candidate that fits without recomputing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lightning_merak.pipeline.plan.recompute import (
    MemoryBudgetError,
    StageRecompute,
    recompute_per_stage,
    recompute_table,
    resolve_ratios,
)
from lightning_merak.pipeline.plan.schedules import (
    SCHEDULE_NAMES,
    Schedule,
    ScheduleError,
    make_schedule,
    spec,
    without_pre_checkpoints,
)
from lightning_merak.pipeline.plan.simulate import (
    LinkCosts,
    SimResult,
    StageCosts,
    measured_costs,
    simulate,
    with_ratios,
)
from lightning_merak.units import format_bytes

#: Per-stage costs keyed by stages per rank (1: the p-stage partition, 2: the 2p-stage one).
PlacementCosts = Mapping[int, Sequence[StageCosts]]
#: Per-stage block counts, keyed the same way.
PlacementBlocks = Mapping[int, Sequence[int]]


@dataclass(frozen=True)
class ScheduleChoice:
    """What ``pipeline_schedule="auto"`` picked, with its recompute ratios, simulation and a readable reason."""

    name: str
    schedule: Schedule
    ratios: tuple[float, ...]
    result: SimResult
    reason: str
    considered: tuple[tuple[str, str], ...]   # (schedule name, outcome) for every candidate
    runner_up: tuple[str, float] | None = None  # (name, simulated step) of the second best that was eligible

    @property
    def stages_per_rank(self) -> int:
        return spec(self.name).stages_per_rank

    @property
    def recompute(self) -> list[StageRecompute]:
        return recompute_per_stage(self.schedule, self.ratios)


def virtual_stage_costs(costs: Sequence[StageCosts], stages_per_rank: int) -> list[StageCosts]:
    """Split each stage into ``stages_per_rank`` equal chunks, in model order: a stand-in for the real
    2p-stage partition's costs where none was planned (unit tests, projections)."""
    return [c.split(stages_per_rank) for c in costs for _ in range(stages_per_rank)]


def placement_costs(costs: Sequence[StageCosts] | PlacementCosts, stages_per_rank: int) -> list[StageCosts] | None:
    """The costs for ``stages_per_rank``: from a mapping, the planned ones (None where that placement was not
    planned); from a plain list of one-per-rank costs, those or their split."""
    if isinstance(costs, Mapping):
        return list(costs[stages_per_rank]) if stages_per_rank in costs else None
    return list(costs) if stages_per_rank == 1 else virtual_stage_costs(costs, stages_per_rank)


def whole_blocks(ratios: Sequence[float], blocks: Sequence[int] | None) -> list[float]:
    """Ratios as the stages apply them: rounded up to whole blocks (``StageModule.checkpoint_ratio``)."""
    if blocks is None:
        return list(ratios)
    return [math.ceil(r * n - 1e-9) / n if n else r for r, n in zip(ratios, blocks, strict=True)]


def _placement(name: str, num_ranks: int, num_microbatches: int) -> tuple[int, ...] | None:
    try:
        return make_schedule(name, num_ranks, num_microbatches).stage_to_rank
    except ScheduleError:
        return None


def _summary(rows: Sequence[StageRecompute]) -> str:
    busy = [r for r in rows if r.forwards]
    if not busy:
        return "recomputes nothing"
    return "recomputes " + ", ".join(f"stage {r.stage} {r.forwards}/{r.num_microbatches} forwards "
                                     f"({r.flops_share:.0%} of its forward FLOPs)" for r in busy)


def choose_schedule(costs: Sequence[StageCosts] | PlacementCosts, num_microbatches: int, *,
                    memory_budget: float | None = None, link: LinkCosts | None = None,
                    recompute: str | float = "stage_aware", candidates: Sequence[str] | None = None,
                    pre_checkpoint: bool = True, blocks: PlacementBlocks | None = None) -> ScheduleChoice:
    """Pick the schedule with the shortest simulated step that fits the memory budget.

    ``costs``: ``{1: p-stage costs, 2: 2p-stage costs}``, the partitions planned for each placement, so that
    every candidate is simulated on the partition it would really run (a placement missing from the mapping
    was not planned: its schedules are not applicable); or a plain list of p-stage costs, whose stages are
    split in two for the two-stage-per-rank candidates (``virtual_stage_costs``, a stand-in). Candidates whose
    micro-batch rules fail, or that cannot fit the budget at any recompute ratio, are skipped with the reason
    recorded; unless recomputation is asked for (``"full"``, a ratio), so are those that recompute while
    another fits without (module docstring).
    ``pre_checkpoint=False``: the runtime ignores Merak's pre-checkpointing (``recompute="none"``), so the
    schedules are simulated without it. ``blocks``: each placement's block count per stage, so that ratios are
    simulated as the stages apply them, in whole blocks. Raises ``MemoryBudgetError`` when none fits.
    """
    p = next(len(c) // k for k, c in costs.items()) if isinstance(costs, Mapping) else len(costs)
    names = list(candidates or SCHEDULE_NAMES)
    considered: dict[str, str] = {}
    fits: list[tuple[str, Schedule, list[float], SimResult, list[StageRecompute]]] = []
    for name in names:
        try:
            sched = make_schedule(name, p, num_microbatches)
        except ScheduleError as err:
            considered[name] = f"not applicable: {err}"
            continue
        if not pre_checkpoint:
            sched = without_pre_checkpoints(sched)
        stage_costs = placement_costs(costs, spec(name).stages_per_rank)
        if stage_costs is None:
            considered[name] = "not applicable: no partition planned for its placement"
            continue
        try:
            ratios = resolve_ratios(recompute, sched, stage_costs, memory_budget, link=link)
        except MemoryBudgetError as err:
            considered[name] = f"does not fit: {err}"
            continue
        ratios = whole_blocks(ratios, (blocks or {}).get(spec(name).stages_per_rank))
        result = simulate(sched, with_ratios(stage_costs, ratios), link)
        rows = recompute_per_stage(sched, ratios)
        considered[name] = (f"step {result.makespan:.4g}, bubble {result.bubble_fraction:.1%}, "
                            f"{_summary(rows)}")
        fits.append((name, sched, ratios, result, rows))
    if not fits:
        raise MemoryBudgetError("no pipeline schedule fits: " + "; ".join(f"{n}: {o}" for n, o in considered.items()))
    budget = "no memory budget" if memory_budget is None else f"budget {format_bytes(memory_budget)} per device"
    eligible = fits
    if recompute in ("stage_aware", "none"):   # nothing asked for recomputation: only memory may force it
        plain = [f for f in fits if not any(r.forwards for r in f[4])]
        if plain:
            why = f"fits without recomputing ({budget})"
            for name, *_ in fits:
                if all(name != f[0] for f in plain):
                    considered[name] = f"skipped, recomputes while others need not: {considered[name]}"
            eligible = plain
        else:
            why = f"every candidate must recompute to fit ({budget})"
    else:
        why = f"recompute={recompute!r}, {budget}"
    ranked = sorted(eligible, key=lambda f: f[3].makespan)   # stable: registry order breaks ties
    name, sched, ratios, result, rows = ranked[0]
    runner_up = (ranked[1][0], ranked[1][3].makespan) if len(ranked) > 1 else None
    second = (f"runner-up {runner_up[0]} {runner_up[1]:.4g} (+{runner_up[1] / result.makespan - 1:.1%})"
              if runner_up else "no other candidate eligible")
    reason = (f"{name} ({spec(name).stages_per_rank} stage(s) per rank): shortest simulated step "
              f"{result.makespan:.4g}, {second}; {why}; {_summary(rows)}; {num_microbatches} micro-batches, "
              f"{p} pipeline ranks. Considered: " + "; ".join(f"{n} {o}" for n, o in considered.items() if n != name))
    return ScheduleChoice(name, sched, tuple(ratios), result, reason, tuple(considered.items()), runner_up)


@dataclass(frozen=True)
class ScheduleDecision:
    """The schedule to run, the recompute ratio of every stage, and why (logged)."""

    name: str
    ratios: tuple[float, ...]
    reason: str


class AutoSchedule:
    """``pipeline_schedule`` + ``recompute`` + ``memory_budget`` -> a ``ScheduleDecision`` (``decision``).

    ``costs`` are the partition's modelled per-stage costs (FLOPs as time, exact bytes): for "auto" a mapping
    ``{stages per rank: costs}`` of every placement planned (see ``choose_schedule``). With a named schedule the
    ratios come from ``recompute`` (Merak's formula, or the least that fits the budget); with "auto" every
    candidate is simulated on its placement's costs and the shortest that fits wins (``stages_per_rank`` says
    which placement to cut), and ``remeasured`` repeats that choice with the compute times of a real step,
    among the schedules of the same placement (every stage on the same rank), until ``settle`` fixes it. With
    DELTA the memory manager decides per block (keep, swap or recompute) against each stage's budget, so
    nothing is checkpointed on top of it.
    ``pre_checkpoint``: whether the runtime runs Merak's pre-checkpointed forwards (not with
    ``recompute="none"``); ``blocks``: each placement's block count per stage (ratios in whole blocks).
    """

    def __init__(self, schedule: str, recompute: str | float, memory_budget: float | None, num_ranks: int,
                 num_microbatches: int, costs: Sequence[StageCosts] | PlacementCosts, *,
                 candidates: Sequence[str] | None = None, layers_per_stage: int | None = None,
                 memory_managed: bool = False, link: LinkCosts | None = None, pre_checkpoint: bool = True,
                 blocks: PlacementBlocks | None = None) -> None:
        self.recompute = "none" if memory_managed else recompute
        self.budget = None if memory_managed else memory_budget
        self.num_ranks = num_ranks
        self.num_microbatches = num_microbatches
        self.link = link
        self.pre_checkpoint = pre_checkpoint
        self.blocks = blocks
        self.settled = schedule != "auto"
        if schedule == "auto":
            choice = self._choose(costs, candidates or SCHEDULE_NAMES)
            self.stages_per_rank = choice.stages_per_rank
            placement = choice.schedule.stage_to_rank   # the re-choice keeps it: the model is cut for it
            self.candidates = tuple(n for n in (candidates or SCHEDULE_NAMES)
                                    if _placement(n, num_ranks, num_microbatches) == placement)
            self.costs = placement_costs(costs, self.stages_per_rank)
            self.decision = ScheduleDecision(choice.name, choice.ratios, choice.reason)
        else:
            self.stages_per_rank = spec(schedule).stages_per_rank
            self.candidates = (schedule,)
            self.costs = list(costs[self.stages_per_rank] if isinstance(costs, Mapping) else costs)
            ratios = whole_blocks(resolve_ratios(self.recompute, self._schedule(schedule), self.costs, self.budget,
                                                 link=link, layers_per_stage=layers_per_stage),
                                  (blocks or {}).get(self.stages_per_rank))
            self.decision = ScheduleDecision(schedule, tuple(ratios), f"{schedule} (named), "
                                             f"recompute={self.recompute!r}")

    @property
    def reselects(self) -> bool:
        """Whether a measured step may still change the decision ("auto", until settled)."""
        return not self.settled

    @property
    def ratios(self) -> tuple[float, ...]:
        return self.decision.ratios

    def recompute_plan(self) -> list[StageRecompute]:
        """What each stage of the decided schedule recomputes per step, pre-checkpointed forwards included."""
        return recompute_per_stage(self._schedule(self.decision.name), self.ratios)

    def recompute_report(self) -> str:
        """One line per stage and the table, as logged at start-up."""
        rows = self.recompute_plan()
        return f"{_summary(rows)}:\n{recompute_table(rows)}"

    def remeasured(self, events: Sequence[dict], step: int) -> ScheduleDecision:
        """The choice again with each stage's measured forward and backward times (``measured_costs``),
        among the schedules of the placement the model was cut into."""
        costs = measured_costs(events, self.costs, self.ratios)
        choice = self._choose({self.stages_per_rank: costs}, self.candidates)
        return ScheduleDecision(choice.name, choice.ratios, f"re-chosen from the times measured in step {step}: "
                                                            f"{choice.reason}")

    def simulated_seconds(self, events: Sequence[dict], decision: ScheduleDecision) -> float:
        """``decision``'s step as the simulator predicts it from a real step's measured stage times: what
        ``remeasured`` compares candidates by, and what ``benchmarks/schedules.py`` holds against the measured
        step time (the simulator's truth, apart from the FLOP model's)."""
        costs = with_ratios(measured_costs(events, self.costs, self.ratios), decision.ratios)
        return simulate(self._schedule(decision.name), costs, self.link).makespan

    def settle(self, decision: ScheduleDecision) -> None:
        self.decision, self.settled = decision, True

    def _schedule(self, name: str) -> Schedule:
        sched = make_schedule(name, self.num_ranks, self.num_microbatches)
        return sched if self.pre_checkpoint else without_pre_checkpoints(sched)

    def _choose(self, costs: Sequence[StageCosts] | PlacementCosts, candidates: Sequence[str]) -> ScheduleChoice:
        return choose_schedule(costs, self.num_microbatches, memory_budget=self.budget, link=self.link,
                               recompute=self.recompute, candidates=candidates, pre_checkpoint=self.pre_checkpoint,
                               blocks=self.blocks)
