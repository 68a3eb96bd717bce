"""Pipeline parallelism: schedules as action lists, their simulator, stage-aware recompute, the runtime.

Schedules, simulation, recompute ratios and timelines are pure and run without a process group; the
runtime (``build_schedule``, ``forward_only_schedule``, ``ActionListSchedule``) executes them on torch's
pipelining stages.
"""

from lightning_merak.pipeline.recompute import (
    MemoryBudgetError,
    ratios_for_budget,
    resolve_ratios,
    stage_aware_ratios,
)
from lightning_merak.pipeline.runtime import ActionListSchedule, build_schedule, forward_only_schedule
from lightning_merak.pipeline.schedules import (
    SCHEDULE_NAMES,
    Action,
    Schedule,
    ScheduleError,
    make_schedule,
    validate,
)
from lightning_merak.pipeline.simulate import (
    LinkCosts,
    ScheduleChoice,
    SimResult,
    StageCosts,
    choose_schedule,
    simulate,
)
from lightning_merak.pipeline.timeline import plot_gantt, to_chrome_trace, write_chrome_trace

__all__ = [
    "SCHEDULE_NAMES",
    "Action",
    "ActionListSchedule",
    "LinkCosts",
    "MemoryBudgetError",
    "Schedule",
    "ScheduleChoice",
    "ScheduleError",
    "SimResult",
    "StageCosts",
    "build_schedule",
    "choose_schedule",
    "forward_only_schedule",
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
