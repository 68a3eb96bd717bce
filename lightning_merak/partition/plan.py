"""Partition plans: legal cuts on the proxy graph, stages balanced by dynamic programming.

A cut before unit k is *legal* when every tensor made before it from the parameters of earlier units and used
after it is, at its first use after the cut, an argument of a unit call: the next stage then receives it and
writes it into that argument (see ``pipeline/stage.py``). Parameter-free work on the batch (masks, rotary
tables, position ids) carries no taint, so every stage recomputes it. A tensor first used after the cut by the
parent's own code (a residual inside a block) makes the cut illegal. Among legal cuts the stages minimise the
most expensive stage (forward + backward = 3 x forward FLOPs), ties broken by fewer bytes crossing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_merak.trace import Capture, capture, find_units


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
        if first[0] != "call":
            producer = cap.units[max(u for u in info["taint"] if u < k)]
            return [], (f"tensor of shape {info['shape']} made by `{producer}` is read after the cut by the "
                        f"parent's own code (`{first[1]}`) before any block receives it")
        keys.append(key)
    return keys, None


def first_read_after(cap: Capture, key: int, k: int) -> tuple[int, int]:
    start = cap.calls[cap.first_call[k]].time
    r = next(r for r in cap.tensors[key]["reads"] if r[0] >= start)
    return r[1][1], r[1][2]


@dataclass
class StagePlan:
    index: int
    units: list[str]
    first: int  # first unit index
    params: int
    flops: int
    sends: list[int]  # crossing keys to the next stage


@dataclass
class Tie:
    names: list[str]
    stages: list[int]


@dataclass
class PartitionPlan:
    units: list[str]
    stages: list[StagePlan]
    cuts: list[int]
    capture: Capture = field(repr=False)
    tied: list[Tie] = field(default_factory=list)

    @property
    def balance(self) -> float:
        costs = [s.flops for s in self.stages]
        mean = sum(costs) / len(costs)
        return max(costs) / mean if mean else 1.0

    def to_dict(self) -> dict:
        """JSON-ready: per stage the blocks it owns, parameters, forward FLOPs and the tensors it sends."""
        return {"num_stages": len(self.stages), "balance": self.balance, "cuts": [self.units[c] for c in self.cuts],
                "tied": [{"names": t.names, "stages": t.stages} for t in self.tied],
                "stages": [{"index": s.index, "modules": s.units, "parameter_bytes": s.params,
                            "forward_flops": s.flops,
                            "sends": [{"shape": list(self.capture.tensors[k]["shape"]),
                                       "dtype": str(self.capture.tensors[k]["dtype"]),
                                       "bytes": _nbytes(self.capture.tensors[k])} for k in s.sends]}
                           for s in self.stages]}

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        lines = [f"{'stage':>5}  {'modules':<44} {'params':>10} {'fwd GFLOPs':>10} {'sends':>20}"]
        for st in self.stages:
            rng = st.units[0] if len(st.units) == 1 else f"{st.units[0]} .. {st.units[-1]}"
            nbytes = sum(_nbytes(self.capture.tensors[k]) for k in st.sends)
            lines.append(f"{st.index:>5}  {rng:<44} {st.params:>10,} {st.flops / 1e9:>10.4f} "
                         f"{len(st.sends):>3} tensors {nbytes:>8,} B")
        lines.append(f"balance (max stage / mean, forward FLOPs): {self.balance:.3f}")
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


def plan_model(module: nn.Module, example_inputs: Any, num_stages: int, partition: Any = "auto") -> PartitionPlan:
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
    if partition != "auto":
        cuts = []
        for name in partition:
            if name not in units:
                raise PartitionError(f"partition boundary {name!r} is not a block of the pipelined module; blocks: "
                                     f"{units}")
            k = units.index(name)
            if k not in legal:
                raise PartitionError(f"cannot start a stage at {name!r}: {reasons.get(k, 'not a legal cut')}")
            cuts.append(k)
    else:
        if len(legal) < num_stages - 1:
            raise PartitionError(f"{type(module).__name__} has {len(legal)} legal cut points, so at most "
                                 f"{len(legal) + 1} pipeline stages; pipeline_parallel_size={num_stages} is too large.")
        cost = [3 * f + 1 for f in cap.unit_flops]
        cuts = _balanced_cuts(cost, sorted(legal), num_stages, {k: sum(_nbytes(cap.tensors[x]) for x in v)
                                                                 for k, v in legal.items()})
    bounds = [0, *cuts, n]
    stages = []
    for s in range(num_stages):
        a, b = bounds[s], bounds[s + 1]
        sends = legal[b] if s < num_stages - 1 else []
        stages.append(StagePlan(s, units[a:b], a, sum(cap.unit_params[a:b]), sum(cap.unit_flops[a:b]), sends))
    plan = PartitionPlan(units, stages, cuts, cap)
    plan.tied = _ties(module, plan)
    return plan


def _balanced_cuts(cost: list[int], legal: list[int], num_stages: int, cut_bytes: dict[int, int]) -> list[int]:
    """Legal cuts minimising the most expensive stage; ties broken by the sum of squared stage costs (the
    other stages balanced too), then by fewer bytes crossing. Dynamic programming over (cut, stages left)."""
    n = len(cost)
    prefix = [0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    points = [0, *legal]
    memo: dict[tuple[int, int], tuple] = {}

    def solve(i: int, stages: int) -> tuple:
        key = (i, stages)
        if key in memo:
            return memo[key]
        start = points[i]
        if stages == 1:
            tail = prefix[n] - prefix[start]
            memo[key] = (tail, tail * tail, 0, [])
            return memo[key]
        result: tuple = (float("inf"), float("inf"), 0, [])
        for j in range(i + 1, len(points) - stages + 2):
            head = prefix[points[j]] - prefix[start]
            rest = solve(j, stages - 1)
            cand = (max(head, rest[0]), head * head + rest[1], rest[2] + cut_bytes[points[j]], [points[j], *rest[3]])
            if cand[:3] < result[:3]:
                result = cand
        memo[key] = result
        return result

    return solve(0, num_stages)[3]


def _ties(module: nn.Module, plan: PartitionPlan) -> list[Tie]:
    owners: dict[int, list[tuple[str, int]]] = {}
    for s in plan.stages:
        for u in s.units:
            for pname, p in module.get_submodule(u).named_parameters(remove_duplicate=False):
                owners.setdefault(id(p), []).append((f"{u}.{pname}", s.index))
    ties = []
    for entries in owners.values():
        stages = sorted({s for _, s in entries})
        if len(stages) > 1:
            ties.append(Tie([n for n, _ in entries], stages))
    return ties
