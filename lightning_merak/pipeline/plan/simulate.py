"""Discrete-event simulation of a pipeline schedule: makespan, bubble, per-stage peak activation memory.

Each rank runs its action list in order; an action starts when its rank is free and its input has arrived:

- ``F(s, mb)`` needs ``F(s−1, mb)`` plus one point-to-point transfer (none when both stages share a rank);
- ``B``/``I(s, mb)`` need the gradient from ``B``/``I(s+1, mb)`` plus one transfer; ``W`` follows its ``I``;
- a backward of a micro-batch forwarded with recompute ratio r > 0 first recomputes r·forward *after* its
  gradient arrives (ordinary checkpointing); so does its weight step ``W`` when the backward is split, since
  torch's checkpoint recomputes once per backward pass; a ``pre_checkpointed`` backward recomputes the whole
  forward *before* waiting for the gradient (Merak's ``RecomputeRecvGrad``), so the recomputation can fill
  the wait.

Transfers cost ``latency + bytes / bandwidth`` and overlap compute. Memory model, per (stage, micro-batch):
a forward allocates its activations at its start — all of them (``activation_bytes``), or
``(1−r)·activation_bytes + input_bytes`` when a share r is checkpointed, or only ``input_bytes`` when
pre-checkpointed; a recompute rematerialises the rest at its start; everything is freed at the end of the
backward (``W`` for a split backward). Frees at a time instant happen before allocations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from lightning_merak.pipeline.plan.schedules import Action, Schedule, ScheduleError


@dataclass(frozen=True)
class StageCosts:
    """Per-micro-batch costs of one pipeline stage (seconds, bytes).

    ``backward`` is the full backward; ``backward_input``/``backward_weight`` default to half of it each for
    schedules that split it (ZB), except on stage 0 (``first_stage``): no earlier stage needs its input
    gradient, so its input step does nothing (measured: about 0) and its weight step is the whole backward. ``recompute_ratio`` is the share of the forward that ordinary
    checkpointing drops and recomputes (stage-aware recomputation). ``static_bytes`` (parameters, gradients,
    optimizer state) is only used against a memory budget.
    """

    forward: float = 1.0
    backward: float = 2.0
    backward_input: float | None = None
    backward_weight: float | None = None
    activation_bytes: float = 0.0
    input_bytes: float = 0.0
    recompute_ratio: float = 0.0
    static_bytes: float = 0.0

    @property
    def input_grad(self) -> float:
        return self.backward / 2 if self.backward_input is None else self.backward_input

    @property
    def weight_grad(self) -> float:
        return self.backward - self.input_grad if self.backward_weight is None else self.backward_weight

    def first_stage(self) -> StageCosts:
        """These costs on stage 0 of a split backward: the input-gradient step is empty (the batch needs no
        gradient) and the weight step does the whole backward, unless measured values say otherwise."""
        if self.backward_input is not None:
            return self
        return replace(self, backward_input=0.0,
                       backward_weight=self.backward if self.backward_weight is None else self.backward_weight)

    def kept_bytes(self, pre_checkpointed: bool = False) -> float:
        """Activation bytes a forward leaves in memory until its backward (see the module docstring)."""
        if pre_checkpointed:
            return self.input_bytes
        r = self.recompute_ratio
        return self.activation_bytes if r <= 0 else (1 - r) * self.activation_bytes + self.input_bytes

    def split(self, parts: int) -> StageCosts:
        """Costs of one of ``parts`` equal chunks of this stage (virtual stages of interleaved/V schedules)."""
        return replace(self, forward=self.forward / parts, backward=self.backward / parts,
                       backward_input=None if self.backward_input is None else self.backward_input / parts,
                       backward_weight=None if self.backward_weight is None else self.backward_weight / parts,
                       activation_bytes=self.activation_bytes / parts, static_bytes=self.static_bytes / parts)


@dataclass(frozen=True)
class LinkCosts:
    """Point-to-point link between neighbouring pipeline ranks: seconds per message + bytes per second."""

    latency: float = 0.0
    bandwidth: float = math.inf

    def transfer(self, nbytes: float) -> float:
        return self.latency + (nbytes / self.bandwidth if nbytes else 0.0)


@dataclass(frozen=True)
class Event:
    """One interval of the timeline: ``kind`` is F, B, I, W or R (recompute); ``label`` as printed."""

    rank: int
    stage: int
    kind: str
    mb: int
    start: float
    end: float
    label: str


@dataclass(frozen=True)
class SimResult:
    """Makespan; bubble = idle share of ranks x makespan (recomputation counts as busy); peaks in bytes."""

    makespan: float
    bubble_fraction: float
    busy: tuple[float, ...]                 # compute time per rank, recomputation included
    recompute_time: tuple[float, ...]       # per rank
    peak_memory: tuple[float, ...]          # peak activation bytes per stage
    peak_memory_per_rank: tuple[float, ...]
    timeline: tuple[Event, ...] = field(repr=False)


def _per_stage(costs: StageCosts | Sequence[StageCosts], num_stages: int) -> list[StageCosts]:
    if isinstance(costs, StageCosts):
        return [costs] * num_stages
    costs = list(costs)
    if len(costs) != num_stages:
        raise ValueError(f"got costs for {len(costs)} stages but the schedule has {num_stages}.")
    return costs


def simulate(schedule: Schedule, costs: StageCosts | Sequence[StageCosts], link: LinkCosts | None = None) -> SimResult:
    """Run the schedule on the cost model; raises ``ScheduleError`` if the ranks deadlock."""
    link = link or LinkCosts()
    cs = _per_stage(costs, schedule.num_stages)
    cs[0] = cs[0].first_stage()
    place = schedule.stage_to_rank
    last = schedule.num_stages - 1
    done: dict[tuple[int, str, int], float] = {}   # (stage, "F"|"G"|"W", mb) -> end time; G = input grad out
    pc = schedule.pre_checkpointed()
    free_at = [0.0] * schedule.num_ranks
    cursor = [0] * schedule.num_ranks
    events: list[Event] = []
    mem_deltas: list[tuple[float, int, float]] = []    # (time, stage, +/- bytes)

    def arrival(src_stage: int, dst_stage: int, key: tuple[int, str, int]) -> float | None:
        if key not in done:
            return None
        hop = 0.0 if place[src_stage] == place[dst_stage] else link.transfer(cs[max(src_stage, dst_stage)].input_bytes)
        return done[key] + hop

    def run(rank: int, a: Action) -> bool:
        c = cs[a.stage]
        t = free_at[rank]
        if a.kind == "F":
            ready = 0.0 if a.stage == 0 else arrival(a.stage - 1, a.stage, (a.stage - 1, "F", a.mb))
            if ready is None:
                return False
            start = max(t, ready)
            end = start + c.forward
            mem_deltas.append((start, a.stage, c.kept_bytes((a.stage, a.mb) in pc)))
            events.append(Event(rank, a.stage, "F", a.mb, start, end, str(a)))
            done[(a.stage, "F", a.mb)] = end
        elif a.kind in "BI":
            ready = 0.0 if a.stage == last else arrival(a.stage + 1, a.stage, (a.stage + 1, "G", a.mb))
            if ready is None:
                return False
            pre = (a.stage, a.mb) in pc
            full_bytes = c.activation_bytes
            if pre:  # recompute the whole forward before waiting for the gradient
                r_start, r_end = t, t + c.forward
                start = max(r_end, ready)
                mem_deltas.append((r_start, a.stage, full_bytes - c.input_bytes))
            elif c.recompute_ratio > 0:  # ordinary checkpointing: recompute once the gradient is here
                r_start = max(t, ready)
                r_end = start = r_start + c.recompute_ratio * c.forward
                mem_deltas.append((r_start, a.stage, full_bytes - c.kept_bytes()))
            else:
                r_start = r_end = start = max(t, ready)
            if r_end > r_start:
                events.append(Event(rank, a.stage, "R", a.mb, r_start, r_end, str(Action(a.stage, "R", a.mb))))
            end = start + (c.backward if a.kind == "B" else c.input_grad)
            events.append(Event(rank, a.stage, a.kind, a.mb, start, end, str(a)))
            done[(a.stage, "G", a.mb)] = end
            if a.kind == "B":
                mem_deltas.append((end, a.stage, -full_bytes))
        else:  # W
            # torch's checkpoint recomputes once per backward graph task: the weight step is a second one
            start = t + (c.recompute_ratio * c.forward if (a.stage, a.mb) not in pc else 0.0)
            if start > t:
                events.append(Event(rank, a.stage, "R", a.mb, t, start, str(Action(a.stage, "R", a.mb))))
            end = start + c.weight_grad
            events.append(Event(rank, a.stage, "W", a.mb, start, end, str(a)))
            mem_deltas.append((end, a.stage, -c.activation_bytes))
        free_at[rank] = end
        return True

    remaining = sum(len(r) for r in schedule.actions)
    while remaining:
        progress = False
        for rank, actions in enumerate(schedule.actions):
            while cursor[rank] < len(actions) and run(rank, actions[cursor[rank]]):
                cursor[rank] += 1
                remaining -= 1
                progress = True
        if not progress:
            stuck = {r: str(acts[cursor[r]]) for r, acts in enumerate(schedule.actions) if cursor[r] < len(acts)}
            raise ScheduleError(f"{schedule.name}: simulation deadlocks; ranks wait at {stuck}.")

    makespan = max((e.end for e in events), default=0.0)
    busy = [0.0] * schedule.num_ranks
    recompute = [0.0] * schedule.num_ranks
    for e in events:
        busy[e.rank] += e.end - e.start
        if e.kind == "R":
            recompute[e.rank] += e.end - e.start
    bubble = 1 - sum(busy) / (schedule.num_ranks * makespan) if makespan > 0 else 0.0

    peak_stage = [0.0] * schedule.num_stages
    peak_rank = [0.0] * schedule.num_ranks
    cur_stage = [0.0] * schedule.num_stages
    cur_rank = [0.0] * schedule.num_ranks
    for _time, stage, delta in sorted(mem_deltas, key=lambda d: (d[0], d[2])):  # frees first at equal times
        cur_stage[stage] += delta
        cur_rank[place[stage]] += delta
        peak_stage[stage] = max(peak_stage[stage], cur_stage[stage])
        peak_rank[place[stage]] = max(peak_rank[place[stage]], cur_rank[place[stage]])
    events.sort(key=lambda e: (e.rank, e.start, e.end))
    return SimResult(makespan, bubble, tuple(busy), tuple(recompute), tuple(peak_stage), tuple(peak_rank),
                     tuple(events))


def with_ratios(costs: Sequence[StageCosts], ratios: Sequence[float]) -> list[StageCosts]:
    """The same stage costs with the given per-stage recompute ratios."""
    return [replace(c, recompute_ratio=float(r)) for c, r in zip(costs, ratios, strict=True)]


def measured_costs(events: Sequence[dict], modelled: Sequence[StageCosts],
                   ratios: Sequence[float]) -> list[StageCosts]:
    """Stage costs with compute times measured in a real step (``ActionListSchedule`` timeline events of every
    rank) in place of the modelled ones; bytes stay as modelled (the proxy capture's are exact).

    Per stage: the median full forward (pre-checkpointed ``no_grad`` forwards excluded) and the median backward,
    less the checkpointed share ``ratio × forward`` the backward recomputed; a split backward (zero-bubble
    ``I`` then ``W``) is the sum of their medians, and keeps the two parts. Stages without events keep their
    modelled times, rescaled by the measured/modelled ratio of the others so units stay consistent.
    """
    times: dict[tuple[str, int], list[float]] = {}
    for event in events:
        action = Action.parse(event["action"])
        if action.kind == "R" or (action.kind == "F" and action.pre_checkpointed):
            continue
        times.setdefault((action.kind, action.stage), []).append(event["end"] - event["start"])
    scales = [_median(times["F", s]) / c.forward for s, c in enumerate(modelled) if ("F", s) in times and c.forward]
    scale = _median(scales) if scales else 1.0
    costs = []
    for s, c in enumerate(modelled):
        split = ("I", s) in times and ("W", s) in times
        if ("F", s) not in times or not (("B", s) in times or split):
            costs.append(replace(c, forward=c.forward * scale, backward=c.backward * scale,
                                 backward_input=None if c.backward_input is None else c.backward_input * scale,
                                 backward_weight=None if c.backward_weight is None else c.backward_weight * scale))
            continue
        forward = _median(times["F", s])
        taken = float(ratios[s]) * forward   # the checkpointed share, recomputed inside the (input) backward
        if split:
            grad_in = max(_median(times["I", s]) - taken, 0.05 * forward)
            grad_w = _median(times["W", s])
            costs.append(replace(c, forward=forward, backward=grad_in + grad_w, backward_input=grad_in,
                                 backward_weight=grad_w))
            continue
        backward = max(_median(times["B", s]) - taken, 0.1 * forward)
        costs.append(replace(c, forward=forward, backward=backward, backward_input=None, backward_weight=None))
    return costs


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
