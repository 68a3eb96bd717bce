"""Partition plans: legal cuts on the proxy graph, stages balanced by dynamic programming.

A cut before unit k is *legal* when every tensor made before it from the parameters of earlier units and used
after it can be handed over (see ``pipeline/stage.py``):

- at its first use after the cut it is an argument of a unit call: the next stage receives it and writes it
  into that argument;
- or it is *carried*: first used by the parent's own code or returned by the module (a hidden state in the
  output, the router logits transformers collects from every layer for the MoE auxiliary loss), and made as a
  leaf of a unit call's output or of a hooked inner module's output (the trace's ``made``/``side`` sites). Each
  later stage receives it, hands it back at that site when the stub of that call runs (the stub's output, or the
  hooked module's hooks called with it), and sends it on while anything after the next cut still reads it.

Parameter-free work on the batch (masks, rotary tables, position ids) carries no taint, so every stage
recomputes it. A tensor first used after the cut by the parent's own code and made by it too (a residual inside
a block) makes the cut illegal. Among legal cuts the stages minimise the most expensive stage (forward +
backward = 3 x forward FLOPs), ties broken by fewer bytes crossing.

Under a memory budget (per device) the same dynamic programme only admits stages that fit it (``StageMemory``):
the stage's static bytes (its weights, tied and shared copies included, per tensor-parallel rank, their
gradients, and optimizer state where a factor is given) plus the least activation memory it can run with (as
the schedule simulator models full recomputation, or DELTA's floor). The embedding of a large vocabulary then
leaves blocks to later stages even where FLOPs alone would keep them beside it.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_merak.trace import Capture, capture, find_units
from lightning_merak.units import format_bytes


class PartitionError(ValueError):
    """No legal plan, or a hand-written boundary is illegal; the message names the tensor and the modules."""


def crossing(cap: Capture, k: int) -> tuple[list[int], str | None]:
    """Tensors crossing the cut before unit k, and why the cut is illegal (None if legal)."""
    start = cap.calls[cap.first_call[k]].time
    keys = []
    for key, info in cap.tensors.items():
        if info["born"] >= start or not any(u < k for u in info["taint"]):
            continue
        after = [r for r in info["reads"] if r[0] >= start]
        if not after:
            continue
        first = after[0][1]
        if first[0] != "call" and not (info["made"] or info["side"]):
            producer = cap.units[max(u for u in info["taint"] if u < k)]
            if first[0] == "output":
                return [], (f"tensor of shape {info['shape']} made from `{producer}`'s output by the parent's own "
                            f"code is returned by the module (output leaf {first[1]}), and no block hands it over")
            return [], (f"tensor of shape {info['shape']} made by `{producer}` is read after the cut by the "
                        f"parent's own code (`{first[1]}`) before any block receives it")
        keys.append(key)
    return keys, None


def sites(cap: Capture, key: int, k: int) -> tuple[tuple, ...]:
    """Where the stages on either side of the cut before unit k meet the crossing tensor ``key``: one
    ``("call", c, arg)`` when its first use after the cut is a block argument (the sender takes it there, the
    receiver writes it there); for a carried tensor, where it was made, ``("out", c, leaf)`` and/or
    ``("side", c, module, n, leaf)`` (the first is where the sender takes it; the receiver hands it back at each)."""
    start = cap.calls[cap.first_call[k]].time
    info = cap.tensors[key]
    r = next(r for r in info["reads"] if r[0] >= start)
    if r[1][0] == "call":
        return (("call", r[1][1], r[1][2]),)
    return tuple(s for s in (info["made"], info["side"]) if s)


@dataclass
class Boundary:
    """One tensor crossing to the next stage: ``identity`` is its key in the capture, ``producer`` the last
    block it depends on, ``consumers`` the later blocks that take it as an argument (a skip edge such as an
    encoder output lists blocks several stages ahead: intermediate stages carry it through). ``via``: how the
    next stage takes it, ``"argument"`` of its first consumer, or for a carried tensor the ``"output of `block`"``
    or ``"hooked output of `module`"`` it is handed back as."""

    identity: int
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    producer: str
    consumers: list[str]
    via: str = "argument"


@dataclass
class StagePlan:
    index: int
    units: list[str]
    first: int  # first unit index
    params: int  # parameter bytes
    flops: int  # forward FLOPs
    sends: list[int]  # crossing keys to the next stage, in the order the stage returns them
    num_params: int = 0
    boundary: list[Boundary] = field(default_factory=list)
    saved: int = 0  # bytes autograd saves for backward in one micro-batch's forward
    # blocks of other stages that are never called but whose weights this stage's code reads directly (DeBERTa's
    # relative position embedding): the stage holds a copy, tied to the owner's (gradients summed)
    shared: list[str] = field(default_factory=list)
    static: int = 0  # modelled bytes per device: weights (tied/shared copies, per TP rank), gradients, optimizer state
    reserve: int = 0  # modelled least activation bytes the stage runs with (see StageMemory)


@dataclass
class Tie:
    names: list[str]
    stages: list[int]


@dataclass
class PartitionPlan:
    units: list[str]
    stages: list[StagePlan]
    cuts: list[int]
    capture: Capture | None = field(repr=False)  # None for a plan read back from JSON (description only)
    tied: list[Tie] = field(default_factory=list)
    memory_budget: int | None = None  # per device, when the cut was made to fit one
    # the cuts FLOPs alone would give, where the memory budget moved them (None: it did not)
    compute_cuts: list[int] | None = None

    @property
    def balance(self) -> float:
        """Most expensive stage over the mean (forward FLOPs; backward is ~2x forward for every stage)."""
        costs = [s.flops for s in self.stages]
        mean = sum(costs) / len(costs)
        return max(costs) / mean if mean else 1.0

    def memory_report(self) -> str | None:
        """Whether the memory budget moved the cuts, and each stage's modelled bytes against it (None: no budget)."""
        if self.memory_budget is None:
            return None
        need = ", ".join(f"{format_bytes(s.static)} + {format_bytes(s.reserve)}" for s in self.stages)
        lines = [f"memory_budget {format_bytes(self.memory_budget)} per device; per stage static + activation "
                 f"reserve: {need}"]
        if self.compute_cuts is not None:
            flops = [float(f) for f in self.capture.unit_flops] if self.capture is not None else []
            before = _stage_balance(flops, self.compute_cuts) if flops else float("nan")
            lines.append(f"cuts moved to fit memory_budget: stage bytes "
                         f"[{', '.join(format_bytes(s.static + s.reserve) for s in self.stages)}] (compute balance "
                         f"{self.balance:.2f} instead of {before:.2f}; FLOPs alone would cut at "
                         f"{[self.units[c] for c in self.compute_cuts]})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready: per stage the blocks it owns, parameters, forward FLOPs and the tensors it sends."""
        return {"num_stages": len(self.stages), "balance": self.balance, "units": self.units,
                "cuts": [self.units[c] for c in self.cuts],
                "tied": [{"names": t.names, "stages": t.stages} for t in self.tied],
                "memory_budget": self.memory_budget,
                "stages": [{"index": s.index, "modules": s.units, "parameters": s.num_params,
                            "parameter_bytes": s.params, "forward_flops": s.flops, "static_bytes": s.static,
                            "activation_reserve": s.reserve,
                            "sends": [dict(vars(b), shape=list(b.shape)) for b in s.boundary]}
                           for s in self.stages]}

    def stage_costs(self) -> list:
        """Per-stage costs for the schedule simulator: FLOPs as time units (backward = 2 x forward), the saved
        bytes of one micro-batch, the received bytes, and as static the bytes the memory-aware cut counted
        (``StagePlan.static``), so that the recompute ratios are solved against the same figures."""
        from lightning_merak.pipeline.plan.simulate import StageCosts

        costs = []
        for i, st in enumerate(self.stages):
            received = sum(_nbytes(self.capture.tensors[k]) for k in self.stages[i - 1].sends) if i else 0
            costs.append(StageCosts(forward=float(st.flops or 1), backward=2.0 * float(st.flops or 1),
                                    activation_bytes=float(st.saved), input_bytes=float(received),
                                    static_bytes=float(st.static)))
        return costs

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str, module: nn.Module | None = None, example_inputs: Any = None) -> PartitionPlan:
        """Read a plan back. Without ``module`` it only describes (table, JSON); with the module and example
        inputs its boundaries are re-planned and re-checked, giving a plan that ``build_stage`` accepts."""
        data = json.loads(text)
        if module is not None:
            return plan_model(module, example_inputs, data["num_stages"], partition=data["cuts"])
        units = data["units"]
        stages = [StagePlan(st["index"], st["modules"], units.index(st["modules"][0]), st["parameter_bytes"],
                            st["forward_flops"], [b["identity"] for b in st["sends"]], st["parameters"],
                            [Boundary(**dict(b, shape=tuple(b["shape"]))) for b in st["sends"]],
                            static=st.get("static_bytes", 0), reserve=st.get("activation_reserve", 0))
                  for st in data["stages"]]
        return cls(units, stages, [units.index(c) for c in data["cuts"]], None,
                   [Tie(t["names"], t["stages"]) for t in data["tied"]], data.get("memory_budget"))

    def table(self) -> str:
        lines = [f"{'stage':>5}  {'modules':<40} {'parameters':>14} {'fwd GFLOPs':>11}  {'to next stage':>24}"]
        for st in self.stages:
            rng = st.units[0] if len(st.units) == 1 else f"{st.units[0]} .. {st.units[-1]}"
            nbytes = sum(b.bytes for b in st.boundary)
            sends = f"{len(st.boundary)} tensors {format_bytes(nbytes)}" if st.index < len(self.stages) - 1 else "-"
            lines.append(f"{st.index:>5}  {rng:<40} {st.num_params:>14,} {st.flops / 1e9:>11.4f}  {sends:>24}")
        for t in self.tied:
            lines.append(f"tied: {' = '.join(t.names)} on stages {t.stages} (gradients all-reduced between them)")
        lines.append(f"balance (max stage / mean, forward FLOPs): {self.balance:.3f}")
        memory = self.memory_report()
        if memory:
            lines.append(memory)
        return "\n".join(lines)


def _nbytes(info: dict) -> int:
    n = 1
    for d in info["shape"]:
        n *= d
    return n * torch.empty((), dtype=info["dtype"]).element_size()


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Accept ``(args, kwargs)``, a tuple of positional arguments, a dict of keyword arguments or a tensor."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[0], tuple)
            and isinstance(example_inputs[1], dict)):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    return tuple(example_inputs), {}


class StageMemory:
    """What a stage of blocks ``[a, b)`` holds per device, as the memory-aware cut counts it (modelled on the proxy
    graph, before any memory exists):

    - ``static``: the weights the stage holds (its blocks', and the copies of tied or shared weights it keeps),
      each tensor once and a TP-sharded one as its 1/tp slice, their gradients, and ``optimizer_states`` more
      copies (2, Adam's moments, unless told: the build recipe passes what the strategy measured of the
      user's optimizer, ``zero.weight_sized_states``, since the real one is made after the cut);
    - ``reserve``: the least activation memory the stage runs with. Recomputing (``memory_manager="none"``), as
      the schedule simulator models full recomputation under 1F1B: one micro-batch's saved bytes, rematerialised
      in its backward, plus the received inputs of the other micro-batches in flight (p - s on stage s, at most
      ``num_microbatches``); so a cut that fits leaves ``ratios_for_budget`` a ratio that fits. Under DELTA none:
      DELTA releases saved tensors below a block's granularity and checks its own floor from the sizes it
      measures in the first step (an error naming the minimum), so the cut fits the static bytes only.
    """

    def __init__(self, module: nn.Module, cap: Capture, num_stages: int, cut_bytes: dict[int, int], *,
                 tp_plan: Any = None, optimizer_states: float = 2.0, memory_manager: str = "none",
                 num_microbatches: int | None = None) -> None:
        if not (isinstance(optimizer_states, (int, float)) and 0 <= optimizer_states < float("inf")):
            raise ValueError(f"optimizer_states={optimizer_states!r} must be a number >= 0 (copies of the weights "
                             "the optimizer keeps: 0 for plain SGD, 1 for SGD with momentum, 2 for Adam)")
        if memory_manager not in ("none", "delta"):
            raise ValueError(f"memory_manager={memory_manager!r}: use 'none' or 'delta'")
        tp = getattr(tp_plan, "tp_size", 1) if tp_plan is not None else 1
        sharded = tp_plan.sharded(module) if tp > 1 else set()
        self.cap, self.num_stages, self.cut_bytes = cap, num_stages, cut_bytes
        self.copies = 2 + optimizer_states
        self.delta = memory_manager == "delta"
        self.num_microbatches = num_microbatches
        # per unit: parameter id -> bytes on one TP rank (a shard rounds up, as an uneven DTensor split does)
        self.unit_tensors = [{id(p): -(-p.numel() // (tp if id(p) in sharded else 1)) * p.element_size()
                              for p in module.get_submodule(u).parameters()} for u in cap.units]
        self.saved_prefix = [0]
        for saved in cap.unit_saved or [0] * len(cap.units):
            self.saved_prefix.append(self.saved_prefix[-1] + saved)
        self._held: dict[tuple[int, int], int] = {}

    def held(self, a: int, b: int) -> int:
        """Weight bytes of the stage: its blocks' and the never-called blocks its code reads, each tensor once."""
        key = (a, b)
        if key not in self._held:
            tensors: dict[int, int] = {}
            for u in [*range(a, b), *_read_units(self.cap, a, b)]:
                tensors.update(self.unit_tensors[u])
            self._held[key] = sum(tensors.values())
        return self._held[key]

    def static(self, a: int, b: int) -> int:
        return int(self.copies * self.held(a, b))

    def reserve(self, stage: int, a: int, b: int) -> int:
        in_flight = self.num_stages - stage
        if self.num_microbatches:
            in_flight = min(in_flight, self.num_microbatches)
        if self.delta:
            return 0
        return self.saved_prefix[b] - self.saved_prefix[a] + (in_flight - 1) * self.cut_bytes.get(a, 0)

    def need(self, stage: int, a: int, b: int) -> int:
        return self.static(a, b) + self.reserve(stage, a, b)


def plan_model(module: nn.Module, example_inputs: Any, num_stages: int,
               partition: str | list[str] = "auto", *, memory_budget: int | None = None, tp_plan: Any = None,
               optimizer_states: float = 2.0, memory_manager: str = "none",
               num_microbatches: int | None = None) -> PartitionPlan:
    """Partition ``module`` (the pipelined module) into ``num_stages`` stages.

    ``example_inputs``: ``(args, kwargs)`` of its forward (or a tuple, dict or tensor) for one micro-batch; any
    device, meta included. ``partition``: ``"auto"`` (balanced by FLOPs) or the block names where stages 1..
    begin, checked for legality like the automatic cuts.
    ``memory_budget``: bytes per device; the automatic cut then admits only stages whose modelled bytes
    (``StageMemory``: static + activation reserve) fit it, and among those balances FLOPs as without it; a
    ``PartitionError`` names the least achievable worst stage when none fits. ``tp_plan``: the ``TPPlan`` the
    stages will be sharded with (a stage's bytes are then those of one TP rank); ``optimizer_states``,
    ``memory_manager``, ``num_microbatches``: the rest of the memory model (see ``StageMemory``).
    """
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget < 1):
        raise ValueError(f"memory_budget={memory_budget!r} must be a whole number of bytes >= 1 (per device), or "
                         "None for a cut balanced by FLOPs alone")
    args, kwargs = normalize_inputs(example_inputs)
    units = find_units(module, num_stages)
    cap = capture(module, tuple(args), dict(kwargs), units)
    for _ in range(3):  # split blocks doing more than half a stage's work (CNN stages at high resolution)
        total = sum(cap.unit_flops) or 1
        heavy = {u for u, f in zip(units, cap.unit_flops, strict=True)
                 if f > total / (2 * num_stages) and any(True for _ in module.get_submodule(u).children())
                 and not any(True for _ in module.get_submodule(u).parameters(recurse=False))}
        if not heavy:
            break
        expand = frozenset(heavy) | frozenset(getattr(cap, "expanded", ()))
        units = find_units(module, num_stages, expand)
        cap = capture(module, tuple(args), dict(kwargs), units)
        cap.expanded = expand
    # blocks in the order the forward calls them (registration order can differ); uncalled ones first
    order = sorted(range(len(units)), key=lambda u: (cap.first_call[u] >= 0, cap.first_call[u]))
    if order != list(range(len(units))):
        units = [units[u] for u in order]
        cap = capture(module, tuple(args), dict(kwargs), units)
    n = len(units)
    legal: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    for k in range(1, n):
        if cap.first_call[k] < 0:
            continue
        keys, why = crossing(cap, k)
        if why is None:
            legal[k] = keys
        else:
            reasons[k] = why
    cut_bytes = {k: sum(_nbytes(cap.tensors[x]) for x in v) for k, v in legal.items()}
    memory = StageMemory(module, cap, num_stages, cut_bytes, tp_plan=tp_plan, optimizer_states=optimizer_states,
                         memory_manager=memory_manager, num_microbatches=num_microbatches)
    compute_cuts = None
    if partition != "auto":
        if isinstance(partition, str) or len(partition) != num_stages - 1:
            raise PartitionError(f"partition={partition!r} must list {num_stages - 1} block names (where stages "
                                 f"1..{num_stages - 1} begin), or be 'auto'")
        cuts = []
        for name in partition:
            if name not in units:
                raise PartitionError(f"partition boundary {name!r} is not a block of the pipelined module; blocks: "
                                     f"{units}")
            k = units.index(name)
            if k not in legal:
                raise PartitionError(f"cannot start a stage at {name!r}: {reasons.get(k, 'not a legal cut')}")
            if cuts and k <= cuts[-1]:
                raise PartitionError(f"partition boundaries must follow the forward order; {name!r} comes before "
                                     f"{units[cuts[-1]]!r}")
            cuts.append(k)
        if memory_budget is not None:
            _warn_if_over_budget(partition, memory, memory_budget, [0, *cuts, n])
    else:
        if len(legal) < num_stages - 1:
            raise PartitionError(f"{type(module).__name__} has {len(legal)} legal cut points, so at most "
                                 f"{len(legal) + 1} pipeline stages; pipeline_parallel_size={num_stages} is too large.")
        cost = [3 * f + 1 for f in cap.unit_flops]
        cuts = _balanced_cuts(cost, sorted(legal), num_stages, cut_bytes)
        _warn_if_forced_imbalance(module, units, cost, cuts, reasons, num_stages)
        if memory_budget is not None:  # the same programme, admitting only the stages that fit the budget
            fitting = _balanced_cuts(cost, sorted(legal), num_stages, cut_bytes, _fits(memory, memory_budget))
            if fitting is None:
                raise PartitionError(_no_fit_message(module, memory, memory_budget, cost, sorted(legal), cuts,
                                                     cut_bytes, num_stages, tp_plan))
            if fitting != cuts:
                compute_cuts, cuts = cuts, fitting
    bounds = [0, *cuts, n]
    stages = []
    for s in range(num_stages):
        a, b = bounds[s], bounds[s + 1]
        sends = legal[b] if s < num_stages - 1 else []
        num_params = sum(p.numel() for u in units[a:b] for p in module.get_submodule(u).parameters())
        boundary = [_boundary(cap, key, b) for key in sends]
        stages.append(StagePlan(s, units[a:b], a, sum(cap.unit_params[a:b]), sum(cap.unit_flops[a:b]), sends,
                                num_params, boundary, sum(cap.unit_saved[a:b]),
                                shared=[units[u] for u in _read_units(cap, a, b)], static=memory.static(a, b),
                                reserve=memory.reserve(s, a, b)))
    plan = PartitionPlan(units, stages, cuts, cap, memory_budget=memory_budget, compute_cuts=compute_cuts)
    plan.tied = _ties(module, plan)
    return plan


def _span(units: list[str]) -> str:
    return units[0] if len(units) == 1 else f"{units[0]} .. {units[-1]}"


def _fits(memory: StageMemory, budget: int) -> Any:
    return lambda stage, a, b: memory.need(stage, a, b) <= budget


def _warn_if_over_budget(partition: list[str], memory: StageMemory, budget: int, bounds: list[int]) -> None:
    """A hand-written partition is kept as written; a stage over the budget is said, with its modelled bytes."""
    over = [(s, memory.need(s, a, b)) for s, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))
            if memory.need(s, a, b) > budget]
    if over:
        warnings.warn(f"partition={partition!r} does not fit memory_budget={format_bytes(budget)} per device: "
                      f"{', '.join(f'stage {s} needs {format_bytes(b)}' for s, b in over)} (static + activation "
                      "reserve, modelled); partition='auto' cuts to fit it", stacklevel=3)


def _no_fit_message(module: nn.Module, memory: StageMemory, budget: int, cost: list[int], legal: list[int],
                    compute_cuts: list[int], cut_bytes: dict[int, int], num_stages: int, tp_plan: Any) -> str:
    """The least worst-stage bytes any legal cut achieves (the same programme, searched on the budget), and what
    to do."""
    n = len(cost)

    def worst(cuts: list[int]) -> tuple[int, int, int, int]:
        bounds = [0, *cuts, n]
        return max((memory.need(s, a, b), s, a, b) for s, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)))

    lo, hi = 0, worst(compute_cuts)[0]
    best = compute_cuts
    while lo < hi:
        mid = (lo + hi) // 2
        found = _balanced_cuts(cost, legal, num_stages, cut_bytes, _fits(memory, mid))
        if found is None:
            lo = mid + 1
        else:
            hi, best = mid, found
    need, s, a, b = worst(best)
    tp = getattr(tp_plan, "tp_size", 1) if tp_plan is not None else 1
    where = f" per tensor-parallel rank (tp={tp})" if tp > 1 else ""
    return (f"memory_budget={budget} bytes ({format_bytes(budget)}) per device cannot hold every stage of "
            f"{type(module).__name__} in {num_stages} pipeline stages: the least worst stage any legal cut achieves "
            f"needs {need} bytes ({format_bytes(need)}){where}, stage {s} ({_span(memory.cap.units[a:b])}): "
            f"weights + gradients{' + optimizer state' if memory.copies > 2 else ''} "
            f"{format_bytes(memory.static(a, b))} and an activation reserve of "
            f"{format_bytes(memory.reserve(s, a, b))}. Use more pipeline stages (pipeline_parallel_size), tensor "
            f"parallelism (tensor_parallel_size), ZeRO (zero_stage=1 shards optimizer state over the data-parallel "
            f"replicas), or a memory_budget of at least {format_bytes(need)}.")


#: a balance (most expensive stage over the mean) worse than this, when illegal cuts would do better, is reported
BALANCE_WARNING = 1.25


def _stage_balance(cost: list[int], cuts: list[int]) -> float:
    bounds = [0, *cuts, len(cost)]
    stages = [sum(cost[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    return max(stages) / (sum(stages) / len(stages))


def _block_of(unit: str) -> str | None:
    """The numbered block a unit belongs to (``model.layers.3`` for ``model.layers.3.mlp``), if any."""
    match = re.match(r"^(.*?\.\d+)(?:\.|$)", unit)
    return match.group(1) if match else unit


def _warn_if_forced_imbalance(module: nn.Module, units: list[str], cost: list[int], cuts: list[int],
                              reasons: dict[int, str], num_stages: int) -> None:
    """Warn when the legal cuts force a balance worse than ``BALANCE_WARNING`` that illegal ones would beat: name
    the tensor that forbids them, the modules that make and read it, and what the user can do."""
    balance = _stage_balance(cost, cuts)
    # only cuts between whole blocks count: a cut inside a block is illegal by nature (its residual stream)
    blocked_at = {k: why for k, why in reasons.items() if _block_of(units[k]) != _block_of(units[k - 1])}
    if balance <= BALANCE_WARNING or not blocked_at:
        return
    every = sorted({*cuts, *blocked_at})
    ideal = _balanced_cuts(cost, every, num_stages, dict.fromkeys(every, 0))
    better = _stage_balance(cost, ideal)
    blocked = [k for k in ideal if k in blocked_at]
    if better >= balance - 0.05 or not blocked:
        return
    k = blocked[0]
    advice = ("Let the model hand that tensor to a later block as an argument, return it from a block (or not "
              "keep it at all), pass partition=[...] with other legal cut points, or use fewer pipeline stages.")
    warnings.warn(f"{type(module).__name__}: the legal cuts give a stage balance of {balance:.2f} (most expensive "
                  f"stage over the mean), cuts at {[units[c] for c in ideal]} would give {better:.2f}, but starting "
                  f"a stage at `{units[k]}` is illegal: {reasons[k]} (in {type(module).__name__}.forward or a "
                  f"module it calls outside the blocks). {advice}", stacklevel=3)


def _read_units(cap: Capture, a: int, b: int) -> list[int]:
    """Blocks outside ``[a, b)`` that are never called but whose weights a stage of those blocks reads directly
    (DeBERTa's relative position embedding): the stage holds a copy of them too."""
    start = cap.calls[cap.first_call[a]].time if a > 0 else -1
    end = cap.calls[cap.first_call[b]].time if b < len(cap.units) else float("inf")
    return [unit for unit, times in cap.param_reads.items()
            if cap.first_call[unit] < 0 and not a <= unit < b and any(start <= t < end for t in times)]


def _boundary(cap: Capture, key: int, k: int) -> Boundary:
    info = cap.tensors[key]
    consumers = sorted({cap.units[cap.calls[r[1][1]].unit] for r in info["reads"]
                        if r[1][0] == "call" and cap.calls[r[1][1]].unit >= k},
                       key=cap.units.index)
    where = sites(cap, key, k)[0]
    via = ("argument" if where[0] == "call" else f"output of `{cap.units[cap.calls[where[1]].unit]}`"
           if where[0] == "out" else f"hooked output of `{where[2]}`")
    return Boundary(key, tuple(info["shape"]), str(info["dtype"]).removeprefix("torch."), _nbytes(info),
                    cap.units[max(u for u in info["taint"] if u < k)], consumers, via)


def _balanced_cuts(cost: list[int], legal: list[int], num_stages: int, cut_bytes: dict[int, int],
                   fits: Any = None) -> list[int] | None:
    """Legal cuts minimising the most expensive stage; ties broken by the sum of squared stage costs (the
    other stages balanced too), then by fewer bytes crossing. Dynamic programming over (cut, stages left).

    ``fits(stage, a, b)``: whether stage ``stage`` may hold blocks ``[a, b)`` (the memory budget); only such
    stages are admitted, and None is returned when no legal cut admits them all."""
    n = len(cost)
    fits = fits or (lambda stage, a, b: True)
    prefix = [0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    points = [0, *legal]
    memo: dict[tuple[int, int], tuple] = {}

    def solve(i: int, stages: int) -> tuple:
        key = (i, stages)
        if key in memo:
            return memo[key]
        start, stage = points[i], num_stages - stages
        if stages == 1:
            tail = prefix[n] - prefix[start]
            memo[key] = (tail, tail * tail, 0, []) if fits(stage, start, n) else (float("inf"), float("inf"), 0, [])
            return memo[key]
        result: tuple = (float("inf"), float("inf"), 0, [])
        for j in range(i + 1, len(points) - stages + 2):
            if not fits(stage, start, points[j]):
                continue
            head = prefix[points[j]] - prefix[start]
            rest = solve(j, stages - 1)
            if rest[0] == float("inf"):
                continue
            cand = (max(head, rest[0]), head * head + rest[1], rest[2] + cut_bytes[points[j]], [points[j], *rest[3]])
            if cand[:3] < result[:3]:
                result = cand
        memo[key] = result
        return result

    best = solve(0, num_stages)
    return None if best[0] == float("inf") else best[3]


def _ties(module: nn.Module, plan: PartitionPlan) -> list[Tie]:
    owners: dict[int, list[tuple[str, int]]] = {}
    for s in plan.stages:
        for u in s.units + s.shared:
            for pname, p in module.get_submodule(u).named_parameters(remove_duplicate=False):
                owners.setdefault(id(p), []).append((f"{u}.{pname}", s.index))
    ties = []
    for entries in owners.values():
        stages = sorted({s for _, s in entries})
        if len(stages) > 1:
            ties.append(Tie([n for n, _ in entries], stages))
    return ties
