"""DELTA's planner: the *filter* picks which saved storages to release, the *director* picks how.

Pure functions over a :class:`~lightning_merak.memory.profiler.ForwardProfile`; no hooks, no devices.

- Filter (DELTA v1): release candidates in order of bytes x lifetime (pack to first unpack), largest
  first, until the predicted peak fits the activation allowance.
- Director: for each candidate compare the *exposed* swap time with the recompute time. Swap traffic
  shares one link: a transfer is hidden while the link's total time stays under the compute time it can
  overlap (forward for swap-out when the tier copies asynchronously, backward for the prefetched swap-in).
  Recompute re-runs the candidate's segment; its cost is the segment's forward time, shared by bytes among
  the storages it frees. With no overlap this is DELTA's rule ``2 * bytes / bandwidth`` vs op time.
- Predicted peak: kept bytes + the most backward must bring back at once (a replayed segment, or one
  segment's swapped storages fetched on demand). If the greedy plan misses the allowance, swap every
  candidate: that plan has the lowest peak. Inputs of a recomputed segment are always kept (as checkpointing does),
  so a replay never needs another replay or a swap first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning_merak.memory.profiler import ForwardProfile, SegmentKey


@dataclass
class Plan:
    """Decisions for one forward signature."""

    swap: set[int] = field(default_factory=set)
    recompute: set[SegmentKey] = field(default_factory=set)
    keep_forced: set[int] = field(default_factory=set)  # inputs of recomputed segments
    unpack_rank: dict[int, int] = field(default_factory=dict)
    reserve: int = 0  # bytes backward may bring back at once; prefetch leaves them free
    predicted_peak: int = 0
    fits: bool = True

    def describe(self) -> str:
        return (
            f"swap {len(self.swap)} storages, recompute {len(self.recompute)} segment calls, "
            f"predicted peak {self.predicted_peak / 2**20:.1f} MiB"
        )


def predict(profile: ForwardProfile, swap: set[int], recompute: set[SegmentKey]) -> tuple[int, int, set[int]]:
    """(predicted peak, reserve, forced-kept keys) for a set of decisions.

    The reserve is what backward may bring back at once on top of the kept bytes: a replayed segment, or
    the swapped storages of one segment (or one storage outside segments) fetched on demand.
    """
    forced: set[int] = set()
    for seg in recompute:
        info = profile.segments[seg]
        forced.update(info.input_keys)
        forced.update(info.inner_input_keys)
    forced.update(p.key for p in profile.pools.values() if p.escapes and p.segment in recompute)
    kept = 0
    replay_bytes: dict[SegmentKey, int] = {}
    swap_bytes: dict[object, int] = {}
    for p in profile.pools.values():
        in_replay = p.segment in recompute
        if in_replay and p.key not in profile.segments[p.segment].inner_input_keys:
            replay_bytes[p.segment] = replay_bytes.get(p.segment, 0) + p.nbytes
        if p.key in forced or not (in_replay or p.key in swap):
            kept += p.nbytes
        elif p.key in swap and not in_replay:
            group = p.segment if p.segment is not None else ("loose", p.key)
            swap_bytes[group] = swap_bytes.get(group, 0) + p.nbytes
    reserve = max(max(replay_bytes.values(), default=0), max(swap_bytes.values(), default=0))
    return kept + reserve, reserve, forced


def minimum_allowance(profile: ForwardProfile) -> int:
    """The least allowance any plan meets: storages too small to release, plus the largest layer's saved
    storages (inputs included), which backward needs at once."""
    small = sum(p.nbytes for p in profile.pools.values() if not p.releasable)
    largest_segment = max((profile.segment_bytes(k) for k in profile.segments), default=0)
    largest_pool = max((p.nbytes for p in profile.pools.values()), default=0)
    return small + max(largest_segment, largest_pool)


def plan_forward(
    profile: ForwardProfile,
    allowance: int,
    write_bandwidth: float,
    read_bandwidth: float,
    write_overlaps: bool,
) -> Plan:
    """Filter + director for one profiled forward (see the module docstring)."""
    swap: set[int] = set()
    recompute: set[SegmentKey] = set()
    peak, reserve, forced = predict(profile, swap, recompute)
    fwd_s, bwd_s = profile.forward_seconds, profile.backward_seconds
    link_out = link_in = 0.0

    def exposed(used: float, extra: float, window: float) -> float:
        return max(0.0, used + extra - window) - max(0.0, used - window)

    segment_bytes = {k: profile.segment_bytes(k) for k in profile.segments}
    candidates = sorted(
        (p for p in profile.pools.values() if p.releasable),
        key=lambda p: (p.nbytes * max(p.lifetime, 1e-9), p.nbytes),
        reverse=True,
    )
    for p in candidates:
        if peak <= allowance:
            break
        if p.key in swap or p.key in forced or p.segment in recompute:
            continue
        out_t, in_t = p.nbytes / write_bandwidth, p.nbytes / read_bandwidth
        swap_cost = (exposed(link_out, out_t, fwd_s) if write_overlaps else out_t) + exposed(link_in, in_t, bwd_s)
        recompute_cost = float("inf")
        if p.segment is not None and p.key not in profile.segments[p.segment].inner_input_keys:
            seg = profile.segments[p.segment]
            recompute_cost = seg.seconds * p.nbytes / max(segment_bytes[p.segment], 1)
        if recompute_cost < swap_cost:
            trial = recompute | {p.segment}
            new_peak, new_reserve, new_forced = predict(profile, swap, trial)
            if new_peak - new_reserve < peak - reserve:  # frees kept bytes (the reserve is paid once)
                recompute, peak, reserve, forced = trial, new_peak, new_reserve, new_forced
                continue
        swap.add(p.key)
        link_out += out_t
        link_in += in_t
        peak, reserve, forced = predict(profile, swap, recompute)
    if peak > allowance:
        # The greedy choice can strand itself (replays need whole segments back at once); swapping every
        # candidate has the lowest peak of all plans, so it is the fallback.
        swap = {p.key for p in candidates}
        recompute = set()
        peak, reserve, forced = predict(profile, swap, recompute)
    swap = {k for k in swap - forced if profile.pools[k].segment not in recompute}
    rank = {key: i for i, key in enumerate(profile.unpack_order)}
    return Plan(
        swap=swap,
        recompute=recompute,
        keep_forced=forced,
        unpack_rank=rank,
        reserve=reserve,
        predicted_peak=peak,
        fits=peak <= allowance,
    )
