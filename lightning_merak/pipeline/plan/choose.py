"""Which schedule and how much recomputation: ``pipeline_schedule`` and ``recompute`` turned into a decision.

Sits above ``simulate`` and ``recompute`` (it uses both; neither uses it). ``AutoSchedule`` is what the build
recipe asks before the first step, from the partition's modelled costs, and, for ``pipeline_schedule="auto"``,
again after an early step from the times that step measured. Pure: no process group, no stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_merak.pipeline.plan.recompute import MemoryBudgetError, resolve_ratios
from lightning_merak.pipeline.plan.schedules import (
    SCHEDULE_NAMES,
    Schedule,
    ScheduleError,
    make_schedule,
    spec,
)
from lightning_merak.pipeline.plan.simulate import (
    LinkCosts,
    SimResult,
    StageCosts,
    measured_costs,
    simulate,
    with_ratios,
)

#: The candidates of "auto" today: the placement of two stages per rank needs a 2p-stage cut before step 1.
SINGLE_STAGE_SCHEDULES = tuple(n for n in SCHEDULE_NAMES if spec(n).stages_per_rank == 1)

@dataclass(frozen=True)
class ScheduleChoice:
    """What ``pipeline_schedule="auto"`` picked, with its recompute ratios, simulation and a readable reason."""

    name: str
    schedule: Schedule
    ratios: tuple[float, ...]
    result: SimResult
    reason: str
    considered: tuple[tuple[str, str], ...]   # (schedule name, outcome) for every candidate


def virtual_stage_costs(costs: Sequence[StageCosts], stages_per_rank: int) -> list[StageCosts]:
    """Split each stage into ``stages_per_rank`` equal chunks, in model order (for interleaved / V placement)."""
    return [c.split(stages_per_rank) for c in costs for _ in range(stages_per_rank)]


def choose_schedule(costs: Sequence[StageCosts], num_microbatches: int, *, memory_budget: float | None = None,
                    link: LinkCosts | None = None, recompute: str | float = "stage_aware",
                    candidates: Sequence[str] | None = None) -> ScheduleChoice:
    """Pick the schedule with the shortest simulated step that fits the memory budget.

    ``costs`` are per pipeline rank (one stage each); two-stage-per-rank candidates get each stage split in
    two. Candidates whose micro-batch rules fail, or that cannot fit the budget at any recompute ratio, are
    skipped with the reason recorded. Raises ``MemoryBudgetError`` when none fits.
    """
    costs = list(costs)
    p = len(costs)
    names = list(candidates or SCHEDULE_NAMES)
    considered: list[tuple[str, str]] = []
    best: tuple[float, str, Schedule, list[float], SimResult] | None = None
    for name in names:
        try:
            sched = make_schedule(name, p, num_microbatches)
        except ScheduleError as err:
            considered.append((name, f"not applicable: {err}"))
            continue
        per_rank = spec(name).stages_per_rank
        stage_costs = virtual_stage_costs(costs, per_rank) if per_rank > 1 else costs
        try:
            ratios = resolve_ratios(recompute, sched, stage_costs, memory_budget, link=link)
        except MemoryBudgetError as err:
            considered.append((name, f"does not fit: {err}"))
            continue
        result = simulate(sched, with_ratios(stage_costs, ratios), link)
        considered.append((name, f"step {result.makespan:.4g} s, bubble {result.bubble_fraction:.1%}, "
                                 f"recompute ratios {[round(r, 3) for r in ratios]}"))
        if best is None or result.makespan < best[0] - 1e-12:
            best = (result.makespan, name, sched, ratios, result)
    if best is None:
        raise MemoryBudgetError("no pipeline schedule fits: " + "; ".join(f"{n}: {o}" for n, o in considered))
    makespan, name, sched, ratios, result = best
    others = [(n, o) for n, o in considered if n != name]
    budget = "no memory budget" if memory_budget is None else f"budget {memory_budget:.4g} B per device"
    reason = (f"{name}: shortest simulated step {makespan:.4g} s ({budget}, {num_microbatches} micro-batches, "
              f"{p} stages); others: " + "; ".join(f"{n} {o}" for n, o in others))
    return ScheduleChoice(name, sched, tuple(ratios), result, reason, tuple(considered))


@dataclass(frozen=True)
class ScheduleDecision:
    """The schedule to run, the recompute ratio of every stage, and why (logged)."""

    name: str
    ratios: tuple[float, ...]
    reason: str


class AutoSchedule:
    """``pipeline_schedule`` + ``recompute`` + ``memory_budget`` -> a ``ScheduleDecision`` (``decision``).

    ``costs`` are the partition's modelled per-stage costs (FLOPs as time, exact bytes). With a named schedule the
    ratios come from ``recompute`` (Merak's formula, or the least that fits the budget); with "auto" every
    candidate is simulated and the shortest that fits wins, and ``remeasured`` repeats that choice with the
    compute times of a real step, within the same placement, until ``settle`` fixes it. With DELTA the memory
    manager decides per block (keep, swap or recompute) against each stage's budget, so nothing is checkpointed
    on top of it.
    """

    def __init__(self, schedule: str, recompute: str | float, memory_budget: float | None, num_ranks: int,
                 num_microbatches: int, costs: Sequence[StageCosts], *, layers_per_stage: int | None = None,
                 memory_managed: bool = False, link: LinkCosts | None = None) -> None:
        self.recompute = "none" if memory_managed else recompute
        self.budget = None if memory_managed else memory_budget
        self.num_microbatches = num_microbatches
        self.costs = list(costs)
        self.link = link
        self.settled = schedule != "auto"
        if schedule == "auto":
            self.decision = self._choose(self.costs, "")
        else:
            sched = make_schedule(schedule, num_ranks, num_microbatches)
            ratios = resolve_ratios(self.recompute, sched, self.costs, self.budget, link=link,
                                    layers_per_stage=layers_per_stage)
            self.decision = ScheduleDecision(schedule, tuple(ratios), f"{schedule} (named), "
                                             f"recompute={self.recompute!r}")

    @property
    def reselects(self) -> bool:
        """Whether a measured step may still change the decision ("auto", until settled)."""
        return not self.settled

    @property
    def ratios(self) -> tuple[float, ...]:
        return self.decision.ratios

    def remeasured(self, events: Sequence[dict], step: int) -> ScheduleDecision:
        """The choice again with each stage's measured forward and backward times (``measured_costs``)."""
        costs = measured_costs(events, self.costs, self.ratios)
        return self._choose(costs, f"re-chosen from the times measured in step {step}: ")

    def settle(self, decision: ScheduleDecision) -> None:
        self.decision, self.settled = decision, True

    def _choose(self, costs: Sequence[StageCosts], prefix: str) -> ScheduleDecision:
        choice = choose_schedule(costs, self.num_microbatches, memory_budget=self.budget, link=self.link,
                                 recompute=self.recompute, candidates=SINGLE_STAGE_SCHEDULES)
        return ScheduleDecision(choice.name, choice.ratios, prefix + choice.reason)
