"""Pipeline planning, pure: schedules as action lists, their simulator, recompute ratios, the choice of both,
and timelines. Nothing here needs a process group; the runtime (``lightning_merak.pipeline``) only executes.
"""

from lightning_merak.pipeline.plan.choose import (
    AutoSchedule,
    ScheduleChoice,
    ScheduleDecision,
    choose_schedule,
)
from lightning_merak.pipeline.plan.recompute import (
    MemoryBudgetError,
    ratios_for_budget,
    resolve_ratios,
    stage_aware_ratios,
)
from lightning_merak.pipeline.plan.schedules import (
    SCHEDULE_NAMES,
    SCHEDULES,
    Action,
    Schedule,
    ScheduleError,
    ScheduleSpec,
    make_schedule,
    validate,
)
from lightning_merak.pipeline.plan.simulate import LinkCosts, SimResult, StageCosts, simulate
from lightning_merak.pipeline.plan.timeline import plot_gantt, to_chrome_trace, write_chrome_trace

__all__ = [
    "SCHEDULES",
    "SCHEDULE_NAMES",
    "Action",
    "AutoSchedule",
    "LinkCosts",
    "MemoryBudgetError",
    "Schedule",
    "ScheduleChoice",
    "ScheduleDecision",
    "ScheduleError",
    "ScheduleSpec",
    "SimResult",
    "StageCosts",
    "choose_schedule",
    "make_schedule",
    "plot_gantt",
    "ratios_for_budget",
    "resolve_ratios",
    "simulate",
    "stage_aware_ratios",
    "to_chrome_trace",
    "validate",
    "write_chrome_trace",
]
