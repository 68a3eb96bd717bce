"""DELTA's planner: the *filter* picks which saved storages to release, the *director* picks how.

Pure functions over a :class:`~lightning_merak.memory.profiler.ForwardProfile`; no hooks, no devices.

Every way to release bytes is an option with a measured cost:

- recompute a segment call (a layer, or a module inside one): frees what it saves (unless saved again
  outside it, or an input of another replayed call), costs its measured forward time, and brings its saved
  bytes back at once in backward (the *reserve*);
- swap one storage: costs the part of its transfer time that compute cannot hide. Swap-out is hidden only on
  a tier that copies asynchronously (CUDA side stream), behind the forward compute after the pack; swap-in
  only where a copy engine, not the compute's own cores, does the copy (``read_overlaps``), behind the
  backward compute before its first use. The link is shared, so hidden time is counted against each window
  once. The CPU swap file exposes both: it writes on the step's thread and reads with the same cores.
  Transfer times come from measured bandwidths (the profiling step's own transfers on a synchronous tier).

Filter + director (DELTA's two questions, answered together as in the journal version's knapsack): take the
option with the least exposed seconds per freed byte, largest bytes x lifetime on ties (DELTA v1's
filter), until the predicted peak fits the allowance; a segment call replaces the chosen calls nested in
it. Then give back, dearest per byte first, every choice the plan can do without: where the budget leaves
room, more is kept. If no greedy plan fits, every candidate is swapped (the lowest peak of all plans).

Predicted peak: the larger of the kept bytes at the end of forward and, for each thing backward brings back
at once (a replayed call, or one segment's swapped storages fetched on demand), its bytes plus the kept
storages still alive when it comes (used then or later; autograd has freed the rest), all as measured on the
profiled step; plus, where swap-ins are to be hidden, one swapped storage of prefetch room, without which
prefetch would wait and every swap-in would be exposed (if no plan fits with that room, plans are sought
without it, swap-ins counted as exposed). Inputs of a replayed call are always kept (as checkpointing does),
so a replay never needs another replay or a swap first.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field

from lightning_merak.memory.profiler import ForwardProfile, SegmentKey
from lightning_merak.units import format_bytes


@dataclass
class Plan:
    """Decisions for one forward signature."""

    swap: set[int] = field(default_factory=set)
    recompute: set[SegmentKey] = field(default_factory=set)
    keep_forced: set[int] = field(default_factory=set)  # inputs of recomputed segment calls
    unpack_rank: dict[int, int] = field(default_factory=dict)
    reserve: int = 0  # bytes backward may bring back at once; prefetch leaves them free
    predicted_peak: int = 0
    exposed_seconds: float = 0.0  # predicted extra time per step: recompute plus exposed transfers
    fits: bool = True

    def describe(self) -> str:
        return (
            f"swap {len(self.swap)} storages, recompute {len(self.recompute)} segment calls, "
            f"predicted peak {format_bytes(self.predicted_peak)}, "
            f"predicted cost {self.exposed_seconds * 1e3:.1f} ms/step"
        )


class _Model:
    """What releasing each option frees and brings back, precomputed from one profile."""

    def __init__(self, profile: ForwardProfile) -> None:
        self.profile = profile
        pools = profile.pools
        self.inputs: dict[SegmentKey, set[int]] = {
            k: set(s.input_keys) | set(s.inner_input_keys) for k, s in profile.segments.items()
        }
        self.frees: dict[SegmentKey, set[int]] = {k: set() for k in profile.segments}
        self.enclosing: dict[SegmentKey, set[SegmentKey]] = {}  # the calls a call is nested in, itself included
        self.nested: dict[SegmentKey, set[SegmentKey]] = {k: set() for k in profile.segments}  # and in it
        for k in profile.segments:
            chain, up = {k}, profile.segments[k].parent
            while up is not None:
                chain.add(up)
                self.nested[up].add(k)
                up = profile.segments[up].parent
            self.enclosing[k] = chain
        self.replays: dict[SegmentKey, int] = dict.fromkeys(profile.segments, 0)
        self.first_use: dict[SegmentKey, float] = dict.fromkeys(profile.segments, math.inf)  # its replay
        for p in pools.values():
            locations = [p.segment, *p.saved_again_in]
            seg = p.segment
            while seg is not None:  # every call enclosing the first save
                if p.key not in self.inputs[seg]:
                    self.replays[seg] += p.nbytes
                    if p.t_unpack is not None:
                        self.first_use[seg] = min(self.first_use[seg], p.t_unpack)
                    if all(profile.within(loc, seg) for loc in locations):
                        self.frees[seg].add(p.key)
                seg = profile.segments[seg].parent

    def predict(
        self, swap: set[int], recompute: set[SegmentKey], headroom: bool = False
    ) -> tuple[int, int, set[int]]:
        pools = self.profile.pools
        forced: set[int] = set()
        for seg in recompute:
            forced |= self.inputs[seg]
        replayed: set[int] = set()
        for seg in recompute:
            replayed |= self.frees[seg]
        replayed -= forced
        kept = 0
        kept_until: list[float] = []  # last use of each kept storage (inf: unknown, kept to the end)
        kept_bytes: list[int] = []
        swap_groups: dict[object, list[int | float]] = {}  # group -> [bytes, first use]
        largest_swapped = 0
        for p in pools.values():
            if p.key in replayed:
                continue
            if p.key in swap and p.key not in forced:
                name = p.segment if p.segment is not None else ("loose", p.key)
                group = swap_groups.setdefault(name, [0, math.inf])
                group[0] += p.nbytes
                group[1] = min(group[1], p.t_unpack if p.t_unpack is not None else math.inf)
                largest_swapped = max(largest_swapped, p.nbytes)
            else:
                kept += p.nbytes
                kept_until.append(p.t_last_unpack if p.t_last_unpack is not None else math.inf)
                kept_bytes.append(p.nbytes)
        # What backward brings back at once (a replay, or a swap group fetched on demand) lands on the kept
        # storages still alive then: those used at or after that moment (autograd frees the rest).
        events = [(self.first_use[s], self.replays[s]) for s in recompute]
        events += [(t, b) for b, t in swap_groups.values()]
        reserve = max((b for _, b in events), default=0)
        order = sorted(range(len(kept_until)), key=kept_until.__getitem__)
        times = [kept_until[i] for i in order]
        alive_from = list(itertools.accumulate((kept_bytes[i] for i in reversed(order)), initial=0))[::-1]
        peak = kept
        for t, b in events:
            peak = max(peak, alive_from[bisect.bisect_left(times, t)] + b)
        return peak + (largest_swapped if headroom else 0), reserve, forced


def predict(
    profile: ForwardProfile, swap: set[int], recompute: set[SegmentKey], headroom: bool = False
) -> tuple[int, int, set[int]]:
    """(predicted peak, reserve, forced-kept keys) for a set of decisions (see the module docstring);
    ``headroom`` adds the room one prefetched storage needs."""
    return _Model(profile).predict(swap, recompute, headroom)


def minimum_allowance(profile: ForwardProfile) -> int:
    """The least allowance the error check demands: storages too small to release, plus the largest
    layer's saved storages (inputs included), which a layer's replay needs at once."""
    small = sum(p.nbytes for p in profile.pools.values() if not p.releasable)
    layers = [k for k, s in profile.segments.items() if s.parent is None]
    largest_segment = max((profile.segment_bytes(k) for k in layers), default=0)
    largest_pool = max((p.nbytes for p in profile.pools.values()), default=0)
    return small + max(largest_segment, largest_pool)


class _Link:
    """Swap traffic on one link, in one direction: how much of a new transfer compute can hide."""

    def __init__(self, window: float) -> None:
        self.window, self.used = window, 0.0

    def exposed(self, seconds: float, own_window: float) -> float:
        shared = max(0.0, self.used + seconds - self.window) - max(0.0, self.used - self.window)
        return max(shared, seconds - max(own_window, 0.0))


def plan_forward(
    profile: ForwardProfile,
    allowance: int,
    write_bandwidth: float,
    read_bandwidth: float,
    write_overlaps: bool,
    read_overlaps: bool = True,
) -> Plan:
    """Filter + director for one profiled forward (see the module docstring).

    With ``read_overlaps`` (prefetch beside compute) plans are first sought with room for prefetch and
    swap-ins counted as hidden; where none fits, without that room and with every swap-in exposed.
    """
    model = _Model(profile)
    found = None
    for hidden_reads in ([True, False] if read_overlaps else [False]):
        found = _greedy(model, allowance, write_bandwidth, read_bandwidth, write_overlaps, hidden_reads)
        if found[3] <= allowance:
            break
    swap, recompute, cost, peak, reserve, forced = found
    pools = profile.pools
    if peak > allowance:
        # The greedy choice can strand itself (replays need whole segments back at once); swapping every
        # candidate has the lowest peak of all plans, so it is the fallback.
        swap = {p.key for p in pools.values() if p.releasable}
        recompute = set()
        cost = {("swap", k): pools[k].nbytes / write_bandwidth + pools[k].nbytes / read_bandwidth for k in swap}
        peak, reserve, forced = model.predict(swap, recompute)
    swap = {k for k in swap - forced if not any(k in model.frees[s] for s in recompute)}
    rank = {key: i for i, key in enumerate(profile.unpack_order)}
    return Plan(
        swap=swap,
        recompute=recompute,
        keep_forced=forced,
        unpack_rank=rank,
        reserve=reserve,
        predicted_peak=peak,
        exposed_seconds=sum(cost.values()),
        fits=peak <= allowance,
    )


def _greedy(
    model: _Model,
    allowance: int,
    write_bandwidth: float,
    read_bandwidth: float,
    write_overlaps: bool,
    hidden_reads: bool,
) -> tuple[set[int], set[SegmentKey], dict[object, float], int, int, set[int]]:
    """Cheapest exposed seconds per freed byte until the plan fits, then give back what it can spare."""
    profile = model.profile
    pools, segments = profile.pools, profile.segments
    swap: set[int] = set()
    recompute: set[SegmentKey] = set()
    cost: dict[object, float] = {}  # exposed seconds of each choice, ("swap", key) or a segment key
    peak, reserve, forced = model.predict(swap, recompute, hidden_reads)
    t_fwd_end = profile.t_start + profile.forward_seconds
    out_link, in_link = _Link(profile.forward_seconds), _Link(profile.backward_seconds)
    t_bwd = profile.t_backward_start if profile.t_backward_start is not None else t_fwd_end

    def swap_cost(key: int) -> tuple[float, float, float]:
        p = pools[key]
        out_t, in_t = p.nbytes / write_bandwidth, p.nbytes / read_bandwidth
        out_x = out_link.exposed(out_t, t_fwd_end - p.t_pack) if write_overlaps else out_t
        before_use = (p.t_unpack - t_bwd) if p.t_unpack is not None else 0.0
        in_x = in_link.exposed(in_t, before_use) if hidden_reads else in_t
        return out_x + in_x, out_t, in_t

    def released() -> set[int]:
        out = set(swap)
        for seg in recompute:
            out |= model.frees[seg]
        return out - forced

    def nested_in(seg: SegmentKey) -> set[SegmentKey]:
        return model.nested[seg] & recompute

    while peak > allowance:
        gone = released()
        forcing = Counter(k for s in recompute for k in model.inputs[s])  # how many chosen calls keep each key
        best: tuple[float, float, object] | None = None
        for seg, frees in model.frees.items():
            if model.enclosing[seg] & recompute:
                continue
            nested = nested_in(seg)
            # keys kept only as inputs of the nested calls this one would replace are freed by it
            unforced = Counter(k for s in nested for k in model.inputs[s])
            gain = sum(pools[k].nbytes for k in frees - gone if forcing[k] == unforced[k])
            gain -= sum(pools[k].nbytes for k in model.inputs[seg] & gone)  # its inputs would stay
            if gain <= 0:
                continue
            extra = segments[seg].seconds - sum(cost.get(s, 0.0) for s in nested)
            score = (max(extra, 0.0) / gain, -gain * _lifetime(profile, frees))
            if best is None or score < best[:2]:
                best = (*score, seg)
        for p in pools.values():
            if not p.releasable or p.key in gone or p.key in forced:
                continue
            exposed = swap_cost(p.key)[0]
            score = (exposed / p.nbytes, -p.nbytes * p.lifetime)
            if best is None or score < best[:2]:
                best = (*score, ("swap", p.key))
        if best is None:
            break
        choice = best[2]
        if isinstance(choice, tuple) and choice[0] == "swap":
            exposed, out_t, in_t = swap_cost(choice[1])
            swap.add(choice[1])
            out_link.used += out_t
            in_link.used += in_t
            cost[choice] = exposed
        else:
            for s in nested_in(choice):
                recompute.discard(s)
                cost.pop(s, None)
            recompute.add(choice)
            cost[choice] = segments[choice].seconds
            for k in swap & model.frees[choice]:  # replayed now, no longer swapped
                swap.discard(k)
                cost.pop(("swap", k), None)
        peak, reserve, forced = model.predict(swap, recompute, hidden_reads)

    if peak <= allowance:
        # Keep what the budget has room for: undo the dearest choices (per byte) the plan can do without.
        def per_byte(choice: object) -> float:
            if isinstance(choice, tuple) and choice[0] == "swap":
                return cost[choice] / pools[choice[1]].nbytes
            return cost[choice] / max(sum(pools[k].nbytes for k in model.frees[choice]), 1)

        for choice in sorted(cost, key=per_byte, reverse=True):
            if isinstance(choice, tuple) and choice[0] == "swap":
                trial_swap, trial_recompute = swap - {choice[1]}, recompute
            else:
                trial_swap, trial_recompute = swap, recompute - {choice}
            trial = model.predict(trial_swap, trial_recompute, hidden_reads)
            if trial[0] <= allowance:
                swap, recompute = trial_swap, trial_recompute
                peak, reserve, forced = trial
                del cost[choice]
    return swap, recompute, cost, peak, reserve, forced


def _lifetime(profile: ForwardProfile, keys: set[int]) -> float:
    return max((profile.pools[k].lifetime for k in keys), default=0.0)
