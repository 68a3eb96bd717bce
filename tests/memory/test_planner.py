"""Filter and director on synthetic profiles (no hooks, no model)."""

from __future__ import annotations

from lightning_merak.memory.planner import minimum_allowance, plan_forward, predict
from lightning_merak.memory.profiler import ForwardProfile, PoolInfo, SegmentInfo, find_segments

MiB = 2**20


def profile(seconds: float) -> ForwardProfile:
    """Four segments, each saving 3 storages (2, 4, 6 MiB) packed at t=s, read back late in backward."""
    prof = ForwardProfile(t_start=0.0, t_forward_end=4.0, t_backward_start=4.0, t_backward_end=12.0)
    key = 0
    for s in range(4):
        prof.segments[(s, 0)] = SegmentInfo((s, 0), seconds=seconds)
        for size in (2, 4, 6):
            key += 1
            prof.pools[key] = PoolInfo(key, size * MiB, (s, 0), t_pack=float(s), t_unpack=12.0 - s)
    prof.unpack_order = sorted(prof.pools, reverse=True)
    return prof


def test_keeps_everything_when_it_fits():
    plan = plan_forward(profile(0.1), 100 * MiB, 1e9, 1e9, write_overlaps=True)
    assert not plan.swap and not plan.recompute and plan.predicted_peak == 48 * MiB


def test_director_swaps_when_the_transfer_hides():
    # 1 GB/s, 8 s of backward and 4 s of forward: every transfer hides; recompute costs time.
    plan = plan_forward(profile(0.5), 20 * MiB, 1e9, 1e9, write_overlaps=True)
    assert plan.fits and plan.swap and not plan.recompute
    assert plan.predicted_peak <= 20 * MiB
    # The filter releases the longest-lived large storages first: segment 0's 6 MiB storage.
    assert 3 in plan.swap


def test_director_recomputes_when_the_link_is_slow():
    plan = plan_forward(profile(0.01), 20 * MiB, 1e3, 1e3, write_overlaps=False)
    assert plan.fits and plan.recompute and not plan.swap
    peak, reserve, _ = predict(profile(0.01), plan.swap, plan.recompute)
    assert reserve == 12 * MiB and peak == plan.predicted_peak <= 20 * MiB


def test_minimum_allowance_is_the_largest_layer():
    assert minimum_allowance(profile(0.1)) == 12 * MiB  # all storages releasable: the largest layer


def test_segments_of_hf_models(zoo):
    assert [n for n, _ in find_segments(zoo.build("gpt2"))] == [f"transformer.h.{i}" for i in range(4)]
    assert [n for n, _ in find_segments(zoo.build("bert"))] == [f"bert.encoder.layer.{i}" for i in range(3)]
    names = [n for n, _ in find_segments(zoo.build("resnet"))]
    assert "resnet.encoder.stages.0.layers.0.layer.0" in names


def nested_profile(act_seconds: float) -> ForwardProfile:
    """Four layers of 10 ms, each saving 1 MiB (its input), 2 MiB (a matmul output, kept by the layer) and,
    inside a nested ``act`` call whose input is that output, 6 MiB of elementwise intermediates."""
    prof = ForwardProfile(t_start=0.0, t_forward_end=4.0, t_backward_start=4.0, t_backward_end=12.0)
    key = 0
    for s in range(4):
        layer, act = (s, 0), (10 + s, 0)
        prof.segments[layer] = SegmentInfo(layer, seconds=0.010)
        prof.segments[act] = SegmentInfo(act, parent=layer, seconds=act_seconds)
        for size, where in ((1, layer), (2, layer), (6, act)):
            key += 1
            prof.pools[key] = PoolInfo(key, size * MiB, where, t_pack=float(s), t_unpack=12.0 - s)
        prof.segments[layer].inner_input_keys.append(key - 2)
        prof.segments[act].input_keys.append(key - 1)
    prof.unpack_order = sorted(prof.pools, reverse=True)
    return prof


def test_director_recomputes_the_cheapest_bytes_first():
    # Synchronous tier at 1 GB/s: a swap costs ~2 ms per MiB, exposed; the nested call 0.2 ms per MiB.
    prof = nested_profile(act_seconds=0.001)
    plan = plan_forward(prof, 20 * MiB, 1e9, 1e9, write_overlaps=False, read_overlaps=False)
    assert plan.fits and not plan.swap
    assert plan.recompute == {(10, 0), (11, 0), (12, 0), (13, 0)}  # every act, no whole layer
    assert plan.predicted_peak == 12 * MiB + 6 * MiB and plan.exposed_seconds == 0.004
    # Tighter: whole layers (1.2 ms per MiB beyond the act) become worth it, replacing their acts.
    tight = plan_forward(prof, 13 * MiB, 1e9, 1e9, write_overlaps=False, read_overlaps=False)
    assert tight.fits and any(seg[0] < 10 for seg in tight.recompute)
    assert not any((10 + s, 0) in tight.recompute and (s, 0) in tight.recompute for s in range(4))
    # The act is dear now (20 ms for 6 MiB): the whole layer (10 ms for 8 MiB) is chosen instead.
    dear = plan_forward(nested_profile(act_seconds=0.020), 20 * MiB, 1e9, 1e9, False, False)
    assert dear.fits and all(seg[0] < 10 for seg in dear.recompute)


def test_room_left_in_the_budget_is_kept():
    prof = nested_profile(act_seconds=0.001)
    # One act frees 6 MiB but brings 6 back at once in backward; two free enough for 31 MiB.
    plan = plan_forward(prof, 31 * MiB, 1e9, 1e9, write_overlaps=False, read_overlaps=False)
    assert plan.recompute == {(10, 0), (11, 0)} and not plan.swap  # the longest-lived first
    assert plan.predicted_peak == 24 * MiB + 6 * MiB
    # With 1 MiB less, the greedy also swaps two layer inputs (2 ms/MiB) on its way to a fit; giving back
    # what the plan can spare leaves only what 30 MiB needs.
    spare = plan_forward(prof, 30 * MiB, 1e9, 1e9, write_overlaps=False, read_overlaps=False)
    assert spare.predicted_peak == 30 * MiB and not spare.swap


def test_synchronous_swap_is_exposed_and_prefetch_needs_room():
    prof = profile(0.004)  # 2 ms per MiB-ish recompute
    hidden = plan_forward(prof, 30 * MiB, 1e9, 1e9, write_overlaps=True, read_overlaps=True)
    assert hidden.swap and not hidden.recompute  # hidden transfers cost nothing
    # the predicted peak holds one swapped storage of prefetch room on top of what backward fetches at once
    peak, reserve, _ = predict(prof, hidden.swap, set(), headroom=True)
    assert hidden.predicted_peak == peak and peak - reserve > predict(prof, hidden.swap, set())[0] - reserve
    exposed = plan_forward(prof, 30 * MiB, 1e9, 1e9, write_overlaps=False, read_overlaps=False)
    assert exposed.recompute and not exposed.swap  # 2 ms per MiB exposed costs more than recompute
