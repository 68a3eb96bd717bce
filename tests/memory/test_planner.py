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
