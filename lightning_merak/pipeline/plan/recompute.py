"""Stage-aware recomputation (Merak §8): how much of each stage's forward to checkpoint.

Under 1F1B stage i holds about p−i micro-batches in flight, so uniform recomputation leaves the later stages'
memory idle. Merak checkpoints less on later stages; here either by its closed formula from the first stage's
ratio, or, given a memory budget, by the least ratio per stage whose *simulated* peak fits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_merak.pipeline.plan.schedules import Schedule
from lightning_merak.pipeline.plan.simulate import LinkCosts, StageCosts, simulate, with_ratios
from lightning_merak.units import format_bytes

log = logging.getLogger(__name__)

RECOMPUTE_MODES = ("none", "full", "stage_aware")


class MemoryBudgetError(ValueError):
    """No recomputation ratio makes a stage fit the memory budget."""


@dataclass(frozen=True)
class StageRecompute:
    """What one stage recomputes in a training step: ordinary checkpointing of the share ``ratio`` of each
    forward, plus Merak's pre-checkpointed forwards (kept as inputs only and recomputed whole before their
    gradient arrives): those are recomputation too, whatever the ratio says."""

    stage: int
    ratio: float
    pre_checkpointed: int
    num_microbatches: int

    @property
    def forwards(self) -> int:
        """Forwards per step that recompute anything."""
        return self.num_microbatches if self.ratio > 0 else self.pre_checkpointed

    @property
    def flops_share(self) -> float:
        """Recomputed forward work as a share of the stage's forward FLOPs per step."""
        m, pc = self.num_microbatches, self.pre_checkpointed
        return (pc + (m - pc) * self.ratio) / m

    def __str__(self) -> str:
        m, pc = self.num_microbatches, self.pre_checkpointed
        if not self.forwards:
            return f"stage {self.stage}: none"
        parts = ([f"{pc} pre-checkpointed, recomputed whole"] if pc else []) + (
            [f"{m - pc} with {self.ratio:.0%} checkpointed"] if self.ratio > 0 else [])
        return (f"stage {self.stage}: {self.forwards} of {m} forwards ({' + '.join(parts)}), "
                f"{self.flops_share:.1%} of forward FLOPs")


def recompute_per_stage(schedule: Schedule, ratios: Sequence[float]) -> list[StageRecompute]:
    """Per stage, what ``schedule`` with these ratios recomputes each step (the pre-checkpointed forwards are
    the schedule's own: strip them with ``without_pre_checkpoints`` where the runtime does not run them)."""
    pc = schedule.pre_checkpointed()
    return [StageRecompute(st, float(ratios[st]), sum(1 for s, _ in pc if s == st), schedule.num_microbatches)
            for st in range(schedule.num_stages)]


def recompute_table(rows: Sequence[StageRecompute]) -> str:
    """The per-stage recompute plan as printed at start-up."""
    lines = [f"{'stage':>5}  {'ratio':>6}  {'pre-checkpointed':>16}  {'recomputing forwards':>20}  "
             f"{'share of forward FLOPs':>22}"]
    lines += [f"{r.stage:>5}  {r.ratio:>6.3f}  {r.pre_checkpointed:>16}  {f'{r.forwards} of {r.num_microbatches}':>20}  "
              f"{r.flops_share:>22.1%}" for r in rows]
    return "\n".join(lines)


def stage_aware_ratios(first_ratio: float, num_stages: int) -> list[float]:
    """Merak's rule, 0-based: r_i = 1 − (1−r₀)(S−1)/(S−1−i) for i < S−1, last stage 0, clipped at 0.

    It keeps (1−r_i)(S−1−i) constant, so the kept activations shrink as in-flight micro-batches do.
    Examples (merak.md §8): S=4, r₀=0.9 → [0.9, 0.85, 0.7, 0]; S=4, r₀=0.6 → [0.6, 0.4, 0, 0].
    """
    if not 0.0 <= first_ratio <= 1.0:
        raise ValueError(f"recompute ratio {first_ratio} must lie in [0, 1] (share of the first stage's layers).")
    if num_stages < 1:
        raise ValueError(f"num_stages={num_stages} must be >= 1.")
    s = num_stages
    ratios = [max(0.0, round(1 - (1 - first_ratio) * (s - 1) / (s - 1 - i), 12)) for i in range(s - 1)]
    return ratios + [0.0]


def ratios_for_budget(schedule: Schedule, costs: Sequence[StageCosts], memory_budget: float, *,
                      link: LinkCosts | None = None, layers_per_stage: int | None = None,
                      tol: float = 1e-3) -> list[float]:
    """Per stage, the least recompute ratio whose simulated peak (static + activations) fits the budget.

    The budget is per device: with several stages per rank, the stages of a rank share one ratio and are
    checked together. Ratios are rounded up to whole layers when ``layers_per_stage`` is given. Ranks are
    solved in order, each with the others at their current ratios (a stage's peak barely depends on the
    others' timing). Raises ``MemoryBudgetError`` naming the stage that cannot fit even with full recompute.
    """
    costs = list(costs)
    ratios = [0.0] * schedule.num_stages
    static = [0.0] * schedule.num_ranks
    for st, c in enumerate(costs):
        static[schedule.stage_to_rank[st]] += c.static_bytes

    def peak(rank: int, r: float) -> float:
        trial = list(ratios)
        for st in schedule.stages_of(rank):
            trial[st] = r
        return static[rank] + simulate(schedule, with_ratios(costs, trial), link).peak_memory_per_rank[rank]

    def solve(rank: int) -> None:
        if peak(rank, ratios[schedule.stages_of(rank)[0]]) <= memory_budget:
            return
        worst = peak(rank, 1.0)
        if worst > memory_budget:
            stages = schedule.stages_of(rank)
            raise MemoryBudgetError(
                f"memory_budget={format_bytes(memory_budget)} cannot be met on pipeline rank {rank} (stages {stages}) "
                f"even with full recomputation: simulated peak {format_bytes(worst)} (static "
                f"{format_bytes(static[rank])}). Raise memory_budget, use more pipeline stages, fewer micro-batches "
                f"in flight (another schedule) or smaller micro-batches."
            )
        lo, hi = ratios[schedule.stages_of(rank)[0]], 1.0
        while hi - lo > tol:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if peak(rank, mid) <= memory_budget else (mid, hi)
        if layers_per_stage:  # least whole number of layers at or above the continuous answer that fits
            k = math.floor(lo * layers_per_stage)
            while k < layers_per_stage and peak(rank, k / layers_per_stage) > memory_budget:
                k += 1
            hi = k / layers_per_stage
        for st in schedule.stages_of(rank):
            ratios[st] = hi

    # Last rank first (it usually needs none); a second pass catches a peak moved by the others' new timing.
    for _ in range(2):
        for rank in reversed(range(schedule.num_ranks)):
            solve(rank)
    return ratios


def resolve_ratios(recompute: str | float, schedule: Schedule, costs: Sequence[StageCosts] | None = None,
                   memory_budget: float | None = None, *, link: LinkCosts | None = None,
                   layers_per_stage: int | None = None) -> list[float]:
    """Turn the strategy's ``recompute`` option into one ratio per stage for this schedule.

    "none" → 0; "full" → 1 everywhere (Megatron-style full recomputation); a float r₀ → Merak's formula over
    the pipeline ranks (with ``shifted_critical_path``, stage p−2 takes stage p−3's ratio, as Merak's engine
    sets it); "stage_aware" → ``ratios_for_budget`` (needs ``costs`` and ``memory_budget``; without a budget
    nothing forces recomputation, so it is "none", logged).
    """
    s = schedule.num_stages
    if isinstance(recompute, bool) or not isinstance(recompute, (str, int, float)):
        raise ValueError(f"recompute={recompute!r}: use 'none', 'full', 'stage_aware' or a float in [0, 1].")
    if isinstance(recompute, (int, float)):
        per_rank = stage_aware_ratios(float(recompute), schedule.num_ranks)
        if schedule.name == "shifted_critical_path" and schedule.num_ranks > 2:
            per_rank[-2] = per_rank[-3]
        return [per_rank[schedule.stage_to_rank[st]] for st in range(s)]
    if recompute == "none":
        return [0.0] * s
    if recompute == "full":
        return [1.0] * s
    if recompute == "stage_aware":
        if memory_budget is None:
            log.info("recompute='stage_aware' without memory_budget: no stage needs recomputation, using none.")
            return [0.0] * s
        if costs is None:
            raise ValueError("recompute='stage_aware' with a memory_budget needs per-stage costs to simulate.")
        return ratios_for_budget(schedule, costs, memory_budget, link=link, layers_per_stage=layers_per_stage)
    raise ValueError(f"recompute={recompute!r} is unknown; use one of {list(RECOMPUTE_MODES)} or a float in [0, 1].")
