"""Pipeline schedules as data: per-rank lists of compute actions.

A schedule is built, validated, simulated and drawn without a process group; the runtime only executes it
(``runtime.py`` lowers it to torch's ``_Action`` IR, which adds the sends and receives).

Roughly, per action:

- ``F`` (forward): receive the stage input of micro-batch ``mb``, run the stage, send the output on.
  With ``pre_checkpointed`` (Merak's ``PreCheckpointForwardPass``) the forward runs under ``no_grad`` and keeps
  only its inputs.
- ``B`` (full backward): receive the output gradient, backpropagate through the stage, send the input gradient.
  With ``pre_checkpointed`` (Merak's ``RecomputeRecvGrad``) the stage forward is re-run from the kept inputs
  *before* waiting for the gradient, so the recomputation fills time otherwise spent waiting.
- ``I`` / ``W`` (zero-bubble split): input gradient now, weight gradient later.

Schedules: ``gpipe``, ``1f1b``, ``interleaved_1f1b`` and ``zbv`` (two stages per rank, loop and V placement;
same orders as torch's classes) and Merak's ``shifted_critical_path`` (Lai et al., TPDS 2023, §7). The
registry at the end of this module (``SCHEDULES``) is the one list of schedules the package reads.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

COMPUTE_KINDS = ("F", "B", "I", "W")
#: ``R`` (a recomputation) appears only in timelines of real and simulated steps, never in a schedule.
TIMELINE_KINDS = COMPUTE_KINDS + ("R",)
_ACTION_TEXT = re.compile(r"^(\d+)([FBIWR])(\d+)(pc|rc)?$")


class ScheduleError(ValueError):
    """A schedule cannot be built for these sizes, or an action list is malformed."""


@dataclass(frozen=True, order=True)
class Action:
    """One compute action: ``stage`` runs ``kind`` on micro-batch ``mb``.

    ``pre_checkpointed`` on an ``F`` keeps only the stage inputs; on a ``B``/``I`` it recomputes the forward
    before the gradient receive is waited on (Merak's pre-recompute).
    """

    stage: int
    kind: str
    mb: int
    pre_checkpointed: bool = False

    def __str__(self) -> str:
        flag = ("pc" if self.kind == "F" else "rc") if self.pre_checkpointed else ""
        return f"{self.stage}{self.kind}{self.mb}{flag}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """The inverse of ``str``: ``"2F0"``, ``"1B3rc"``, ``"0R1"`` (a timeline's recomputation)."""
        match = _ACTION_TEXT.match(str(text))
        if not match:
            raise ScheduleError(f"cannot parse action {text!r}; expected e.g. '2F0', '0F1pc', '1B3rc'.")
        return cls(int(match[1]), match[2], int(match[3]), match[4] is not None)

    @classmethod
    def from_torch(cls, action: object, pre_checkpointed: bool = False) -> Action:
        """Ours from torch's ``_Action`` (the runtime's records); the flag travels beside torch's IR."""
        from lightning_merak._compat import _ComputationType

        kind = {_ComputationType.FORWARD: "F", _ComputationType.FULL_BACKWARD: "B",
                _ComputationType.BACKWARD_INPUT: "I", _ComputationType.BACKWARD_WEIGHT: "W"}[action.computation_type]
        return cls(action.stage_index, kind, action.microbatch_index, pre_checkpointed and kind in "FBI")

    def to_torch(self) -> object:
        from lightning_merak._compat import _Action, _ComputationType

        kind = {"F": _ComputationType.FORWARD, "B": _ComputationType.FULL_BACKWARD,
                "I": _ComputationType.BACKWARD_INPUT, "W": _ComputationType.BACKWARD_WEIGHT}[self.kind]
        return _Action(self.stage, kind, self.mb)


@dataclass(frozen=True)
class Schedule:
    """Per-rank compute action lists plus the stage placement they assume."""

    name: str
    num_ranks: int
    num_microbatches: int
    stage_to_rank: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]

    @property
    def num_stages(self) -> int:
        return len(self.stage_to_rank)

    def stages_of(self, rank: int) -> list[int]:
        return [s for s, r in enumerate(self.stage_to_rank) if r == rank]

    def pre_checkpointed(self) -> frozenset[tuple[int, int]]:
        """The (stage, micro-batch) pairs whose forward keeps only inputs: the runtime's side table."""
        return frozenset((a.stage, a.mb) for rank in self.actions for a in rank if a.kind == "F" and a.pre_checkpointed)

    def orders(self) -> list[list[str]]:
        """Printable per-rank orders, e.g. ``["0F0", "0F1pc", "0B0rc"]``."""
        return [[str(a) for a in rank] for rank in self.actions]

    def __str__(self) -> str:
        lines = [f"{self.name}: {self.num_stages} stages on {self.num_ranks} ranks, {self.num_microbatches} micro-batches"]
        lines += [f"  rank {r}: " + " ".join(order) for r, order in enumerate(self.orders())]
        return "\n".join(lines)


def _check_sizes(num_ranks: int, num_microbatches: int) -> None:
    if num_ranks < 1:
        raise ScheduleError(f"num_ranks={num_ranks} must be >= 1.")
    if num_microbatches < 1:
        raise ScheduleError(f"num_microbatches={num_microbatches} must be >= 1.")


def _one_f_one_b_order(num_microbatches: int, warmup: int) -> list[tuple[str, int]]:
    """``warmup`` forwards, then alternate backward/forward, then the remaining backwards."""
    warmup = min(warmup, num_microbatches)
    order = [("F", mb) for mb in range(warmup)]
    next_f, next_b = warmup, 0
    while next_b < num_microbatches:
        order.append(("B", next_b))
        next_b += 1
        if next_f < num_microbatches:
            order.append(("F", next_f))
            next_f += 1
    return order


def _single(name: str, num_ranks: int, num_microbatches: int, per_rank: list[list[Action]]) -> Schedule:
    return Schedule(name, num_ranks, num_microbatches, tuple(range(num_ranks)), tuple(tuple(a) for a in per_rank))


def gpipe(num_ranks: int, num_microbatches: int) -> Schedule:
    """GPipe (Huang et al. 2019): all forwards, then all backwards; holds every micro-batch at once."""
    _check_sizes(num_ranks, num_microbatches)
    m = num_microbatches
    per_rank = [[Action(s, "F", mb) for mb in range(m)] + [Action(s, "B", mb) for mb in range(m)]
                for s in range(num_ranks)]
    return _single("gpipe", num_ranks, m, per_rank)


def one_f_one_b(num_ranks: int, num_microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush): stage s runs p−s forwards before its first backward, then alternates.

    Needs at least p micro-batches: torch's ``Schedule1F1B`` (what runs it) refuses fewer, and with fewer the
    warm-up takes every micro-batch, so the order is GPipe's anyway.
    """
    _check_sizes(num_ranks, num_microbatches)
    p, m = num_ranks, num_microbatches
    if m < p:
        raise ScheduleError(
            f"1f1b needs num_microbatches >= the {p} pipeline stages (torch's Schedule1F1B rule); got {m}. Use at "
            f"least {p} micro-batches, or pipeline_schedule='gpipe' (the same order for so few micro-batches; it "
            "runs any count).")
    per_rank = [[Action(s, k, mb) for k, mb in _one_f_one_b_order(m, p - s)] for s in range(p)]
    return _single("1f1b", p, m, per_rank)


def shifted_critical_path(num_ranks: int, num_microbatches: int) -> Schedule:
    """Merak's shifted critical path (``full_critical_path_1f1b``), per the order its schedule code emits.

    - Last stage: plain F/B alternation, no recomputation (its backward follows its forward at once, so
      checkpointing would save nothing).
    - Stage p−2: three forwards before its first backward (an extra, early forward), micro-batches 0 and 1
      pre-checkpointed and recomputed just before their gradient receives.
    - Stage p−3: 1F1B order, micro-batch 0 pre-checkpointed (recomputed before the first gradient receive).
    - Stages s < p−2: the cool-down micro-batches ``M − mb + s < p`` (the last p−s−1) are pre-checkpointed and
      recomputed before their gradient arrives, i.e. inside the cool-down bubble.

    Requires M ≥ 4 and M ≥ p, as Merak's engine does.
    """
    p, m = num_ranks, num_microbatches
    _check_sizes(p, m)
    if p < 2:
        raise ScheduleError("shifted_critical_path needs at least 2 pipeline stages; use '1f1b' or 'gpipe' for one.")
    if m < 4 or m < p:
        raise ScheduleError(
            f"shifted_critical_path needs num_microbatches >= 4 and >= the {p} pipeline stages (Merak's rule); "
            f"got {m}. Use at least {max(4, p)} micro-batches, or pipeline_schedule='1f1b'."
        )
    per_rank: list[list[Action]] = []
    for s in range(p):
        if s == p - 1:
            order, pc = _one_f_one_b_order(m, 1), set()
        elif s == p - 2:
            # One extra forward before the first backward, then B0 B1 back to back: F0 F1 F2 B0 B1 F3 B2 F4 B3 ...
            order = [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("B", 1)]
            for mb in range(3, m):
                order += [("F", mb), ("B", mb - 1)]
            order.append(("B", m - 1))
            pc = {0, 1}
        else:
            order = _one_f_one_b_order(m, p - s)
            pc = {mb for mb in range(m) if m - mb + s < p}
            if s == p - 3:
                pc.add(0)
        per_rank.append([Action(s, k, mb, mb in pc) for k, mb in order])
    return _single("shifted_critical_path", p, m, per_rank)


def _interleaved_rounds(num_ranks: int, num_microbatches: int) -> int:
    rounds = max(1, num_microbatches // num_ranks)
    if num_microbatches % rounds:
        raise ScheduleError(
            f"interleaved_1f1b needs num_microbatches to be a multiple of the number of rounds "
            f"max(1, num_microbatches // pp) = {rounds} (torch's relaxed Megatron rule); got {num_microbatches} "
            f"with pp={num_ranks}. Use a multiple of {num_ranks}."
        )
    return rounds


def interleaved_1f1b(num_ranks: int, num_microbatches: int, stages_per_rank: int = 2) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021), loop placement: stage s on rank s mod p; torch's order."""
    p, m, v = num_ranks, num_microbatches, stages_per_rank
    _check_sizes(p, m)
    if v < 2:
        raise ScheduleError(f"interleaved_1f1b needs stages_per_rank >= 2; got {v}.")
    per_round = m // _interleaved_rounds(p, m)
    per_rank = []
    for rank in range(p):
        warmup = min((v - 1) * per_round + 2 * (p - 1 - rank), m * v)
        total = m * v

        def fwd_stage(step: int, rank: int = rank) -> int:
            return ((step // per_round) % v) * p + rank

        def bwd_stage(step: int, rank: int = rank, warmup: int = warmup) -> int:
            return (v - 1 - ((step - warmup) // per_round) % v) * p + rank

        f_next: dict[int, int] = {}
        b_next: dict[int, int] = {}
        ops: list[Action] = []

        def take(counter: dict[int, int], stage: int) -> int:
            counter[stage] = counter.get(stage, 0) + 1
            return counter[stage] - 1

        for op in range(total):
            st = fwd_stage(op)
            ops.append(Action(st, "F", take(f_next, st)))
            if op >= warmup:
                st = bwd_stage(op)
                ops.append(Action(st, "B", take(b_next, st)))
        for op in range(total, total + warmup):
            st = bwd_stage(op)
            ops.append(Action(st, "B", take(b_next, st)))
        per_rank.append(ops)
    stage_to_rank = tuple(s % p for s in range(p * v))
    return Schedule("interleaved_1f1b", p, m, stage_to_rank, tuple(tuple(a) for a in per_rank))


def zbv(num_ranks: int, num_microbatches: int) -> Schedule:
    """ZB-V (Qi et al. 2024, §6): two stages per rank in a V, backward split into I and W; torch's order."""
    p, m = num_ranks, num_microbatches
    _check_sizes(p, m)
    if m < p:  # torch lowers fewer, but then a rank idles for most of the V: a configuration error
        raise ScheduleError(
            f"zbv needs num_microbatches >= pp ({p}) so that both legs of the V are busy; got {m}. "
            f"Use at least {p} micro-batches (2*pp-1 = {2 * p - 1} for the zero-bubble steady state)."
        )
    n = max(2 * p - 1, m)
    per_rank = []
    for rank in range(p):
        c0, c1 = rank, 2 * p - 1 - rank
        ops: list[Action] = []
        f0 = f1 = b0 = b1 = 0
        for _ in range(2 * (p - rank) - 1):
            ops.append(Action(c0, "F", f0))
            f0 += 1
        for _ in range(rank):
            ops += [Action(c1, "F", f1), Action(c0, "F", f0)]
            f1 += 1
            f0 += 1
        for _ in range(p - rank):
            ops += [Action(c1, "F", f1), Action(c1, "I", b1), Action(c1, "W", b1)]
            f1 += 1
            b1 += 1
        while f1 < f0 or f0 < n:
            if f0 < n:
                ops.append(Action(c0, "F", f0))
                f0 += 1
            ops += [Action(c0, "I", b0), Action(c0, "W", b0), Action(c1, "F", f1), Action(c1, "I", b1),
                    Action(c1, "W", b1)]
            b0 += 1
            f1 += 1
            b1 += 1
        w0, w1 = b0, b1
        for _ in range(rank):
            ops += [Action(c0, "I", b0), Action(c1, "I", b1)]
            b0 += 1
            b1 += 1
        for _ in range(p - rank):
            ops += [Action(c0, "I", b0), Action(c0, "W", w0)]
            b0 += 1
            w0 += 1
        ops += [Action(c1, "W", w) for w in range(w1, b1)]
        ops += [Action(c0, "W", w) for w in range(w0, b0)]
        per_rank.append([a for a in ops if a.mb < m])  # torch pads to 2p−1 micro-batches and drops the extras
    stage_to_rank = tuple(list(range(p)) + list(reversed(range(p))))
    return Schedule("zbv", p, m, stage_to_rank, tuple(tuple(a) for a in per_rank))


def without_pre_checkpoints(schedule: Schedule) -> Schedule:
    """The same order with ordinary forwards and backwards: what the runtime runs with ``recompute="none"``
    (its empty side table), so that the simulator and the recompute report see what really runs."""
    plain = tuple(tuple(replace(a, pre_checkpointed=False) for a in rank) for rank in schedule.actions)
    return replace(schedule, actions=plain)


def forwards_first(schedule: Schedule) -> Schedule:
    """The same schedule with every forward before any backward on each rank (GPipe's order), for a loss that
    couples the batch: the last stage computes it once, after its last forward, over every micro-batch.

    Each rank keeps the relative order of its forwards and of its backwards, so dependencies still hold. The last
    stage's backwards are whole (``I``/``W`` become one ``B``): its gradients were computed with the batch loss.
    """
    last = schedule.num_stages - 1
    per_rank = []
    for actions in schedule.actions:
        forwards = [a for a in actions if a.kind == "F"]
        backwards = [replace(a, kind="B") if a.stage == last and a.kind == "I" else a for a in actions
                     if a.kind != "F" and not (a.stage == last and a.kind == "W")]
        per_rank.append(tuple(forwards + backwards))
    return replace(schedule, name=f"{schedule.name} (forwards first)", actions=tuple(per_rank))


def make_schedule(name: str, num_ranks: int, num_microbatches: int) -> Schedule:
    """Build the named schedule for ``num_ranks`` pipeline ranks; two-stage-per-rank schedules get 2p stages."""
    return spec(name).build(num_ranks, num_microbatches)


def validate(schedule: Schedule) -> None:
    """Check completeness and per-stage order (F before B, I before W), then torch's deadlock check.

    torch's ``_add_send_recv`` lowering simulates all ranks and raises "Malformed compute schedule" when no
    deadlock-free placement of the sends and receives exists; we call it on the lowered copy.
    """
    s_count, m = schedule.num_stages, schedule.num_microbatches
    seen: dict[tuple[int, str, int], int] = {}
    for rank, actions in enumerate(schedule.actions):
        for a in actions:
            if a.kind not in COMPUTE_KINDS:
                raise ScheduleError(f"rank {rank}: action {a} has kind {a.kind!r}; expected one of {COMPUTE_KINDS}.")
            if not (0 <= a.stage < s_count and 0 <= a.mb < m):
                raise ScheduleError(f"rank {rank}: action {a} is out of range ({s_count} stages, {m} micro-batches).")
            if schedule.stage_to_rank[a.stage] != rank:
                raise ScheduleError(f"action {a} is on rank {rank} but stage {a.stage} lives on "
                                    f"rank {schedule.stage_to_rank[a.stage]}.")
            key = (a.stage, a.kind, a.mb)
            if key in seen:
                raise ScheduleError(f"rank {rank}: action {a} appears twice.")
            if a.kind in "BI" and (a.stage, "F", a.mb) not in seen:
                raise ScheduleError(f"rank {rank}: {a} comes before the forward {a.stage}F{a.mb}.")
            if a.kind == "W" and (a.stage, "I", a.mb) not in seen:
                raise ScheduleError(f"rank {rank}: {a} comes before the input-gradient {a.stage}I{a.mb}.")
            seen[key] = rank
    for st in range(s_count):
        for mb in range(m):
            if (st, "F", mb) not in seen:
                raise ScheduleError(f"{schedule.name}: forward {st}F{mb} is missing.")
            if (st, "B", mb) not in seen and not ((st, "I", mb) in seen and (st, "W", mb) in seen):
                raise ScheduleError(f"{schedule.name}: backward of stage {st}, micro-batch {mb} is missing.")
    pc = schedule.pre_checkpointed()
    for rank in schedule.actions:
        for a in rank:
            if a.kind in "BI" and a.pre_checkpointed != ((a.stage, a.mb) in pc):
                raise ScheduleError(f"{a}: a pre-checkpointed forward needs a recomputing backward and vice versa.")
    from lightning_merak._compat import _add_send_recv

    try:
        _add_send_recv({r: list(acts) for r, acts in enumerate(to_torch_actions(schedule))},
                       stage_to_rank=lambda st: schedule.stage_to_rank[st], num_stages=s_count)
    except AssertionError as err:
        raise ScheduleError(f"{schedule.name}: torch's lowering finds no deadlock-free send/recv order ({err}).") from err


def to_torch_actions(schedule: Schedule) -> list[list]:
    """Per-rank lists of torch ``_Action`` (the flags travel separately, see ``Schedule.pre_checkpointed``)."""
    return [[a.to_torch() for a in rank] for rank in schedule.actions]


def from_orders(name: str, num_microbatches: int, orders: Sequence[Sequence[str]],
                stage_to_rank: Sequence[int] | None = None) -> Schedule:
    """Build a schedule from printed orders like ``[["0F0", "0F1pc", "0B0"], ...]`` (tests, CSV round trips)."""
    per_rank = []
    for rank, order in enumerate(orders):
        try:
            per_rank.append(tuple(Action.parse(text) for text in order))
        except ScheduleError as err:
            raise ScheduleError(f"rank {rank}: {err}") from None
    placement = tuple(stage_to_rank) if stage_to_rank is not None else tuple(range(len(orders)))
    return Schedule(name, len(orders), num_microbatches, placement, tuple(per_rank))


@dataclass(frozen=True)
class ScheduleSpec:
    """One registry entry: what config, the strategy, the engine, recompute and the chooser need to know."""

    name: str
    build: Callable[[int, int], Schedule]
    stages_per_rank: int = 1
    splits_backward: bool = False   # I and W actions: torch's split backward runs the weight step later
    pre_checkpoints: bool = False   # Merak's pre-checkpointed forwards (recomputation inside the bubble)
    torch_class: str | None = None  # torch.distributed.pipelining's own class for it (the baseline)


#: The schedules, by name. Adding a schedule is one entry here.
SCHEDULES: dict[str, ScheduleSpec] = {s.name: s for s in (
    ScheduleSpec("gpipe", gpipe, torch_class="ScheduleGPipe"),
    ScheduleSpec("1f1b", one_f_one_b, torch_class="Schedule1F1B"),
    ScheduleSpec("shifted_critical_path", shifted_critical_path, pre_checkpoints=True),
    ScheduleSpec("interleaved_1f1b", interleaved_1f1b, stages_per_rank=2, torch_class="ScheduleInterleaved1F1B"),
    ScheduleSpec("zbv", zbv, stages_per_rank=2, splits_backward=True, torch_class="ScheduleZBVZeroBubble"),
)}
SCHEDULE_NAMES = tuple(SCHEDULES)
#: What ``MerakStrategy(pipeline_schedule=...)`` accepts: a schedule, or "auto" (the simulator chooses).
SCHEDULE_OPTIONS = SCHEDULE_NAMES + ("auto",)
#: Schedules that place two stages on each rank.
MULTI_STAGE_SCHEDULES = tuple(n for n, s in SCHEDULES.items() if s.stages_per_rank > 1)


def spec(name: str) -> ScheduleSpec:
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown pipeline schedule {name!r}; choose one of {list(SCHEDULE_NAMES)}.")
    return SCHEDULES[name]
