"""Paper-scale projection: analytic costs, the CLI entry point, bad layouts."""

from __future__ import annotations

import pytest

from lightning_merak.cli.projection import (
    PRESETS,
    Cluster,
    Layout,
    ModelConfig,
    main_simulate,
    parse_bytes,
    project,
    stage_costs,
)


def test_presets_have_the_papers_sizes() -> None:
    sizes = {name: model.parameters / 1e9 for name, (model, _) in PRESETS.items()}
    assert sizes == pytest.approx({"gpt-1.5b": 1.56, "gpt-2.5b": 2.49, "gpt-8.3b": 8.31, "gpt-20b": 20.25}, abs=0.01)
    for _model, layout in PRESETS.values():
        assert layout.dp * layout.pp * layout.tp == 64


def test_stage_costs_follow_the_flop_and_activation_formulas() -> None:
    model = ModelConfig(layers=8, hidden=1024, heads=16, sequence=512, vocab=1000)
    layout = Layout(dp=1, pp=2, tp=2, micro_batch=2, global_batch=8)
    cluster = Cluster(devices=4, flops=1e12, tp_bandwidth=float("inf"), latency=0.0)
    first, last = stage_costs(model, layout, cluster, subtensor=False)
    b, s, h, t = 2, 512, 1024, 2
    layer = (24 * b * s * h * h + 4 * b * s * s * h) / t / 1e12
    assert first.forward == pytest.approx(4 * layer)
    assert first.backward == pytest.approx(8 * layer)
    head = 2 * b * s * h * 1000 / t / 1e12
    assert last.forward == pytest.approx(4 * layer + head)
    assert first.activation_bytes == pytest.approx(4 * s * b * h * (10 + 24 / t + 5 * 16 * s / (h * t)))
    assert first.input_bytes == pytest.approx(4 * b * s * h * 2)
    assert first.static_bytes == pytest.approx(16 * (12 * 4 * h * h + 1000 * h) / t)


def test_subtensor_overlap_only_hides_tp_communication() -> None:
    model, layout = PRESETS["gpt-1.5b"]
    plain = stage_costs(model, layout, Cluster(), subtensor=False)
    overlapped = stage_costs(model, layout, Cluster(), subtensor=True)
    assert all(o.forward < p.forward for o, p in zip(overlapped, plain, strict=True))
    no_tp = Layout(dp=16, pp=4, tp=1, micro_batch=4, global_batch=512)
    assert stage_costs(model, no_tp, Cluster(), subtensor=True) == stage_costs(model, no_tp, Cluster(), subtensor=False)


def test_merak_beats_1f1b_full_recompute() -> None:
    model, layout = PRESETS["gpt-1.5b"]
    proj = project(model, layout, Cluster())
    assert 1.0 < proj.speedup < 1.5
    assert proj.merak_ratios[-1] == 0.0
    assert max(proj.merak_peak) <= 0.9 * Cluster().memory


def test_cli_prints_the_table_and_rejects_bad_layouts(capsys) -> None:
    assert main_simulate(["--model", "gpt-1.5b", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "gpt-1.5b" in out and "speedup" in out and "x " in out and "cluster:" in out
    assert main_simulate(["--model", "gpt-1.5b", "--dp", "4"]) == 1
    assert "does not use the 64 devices" in capsys.readouterr().out
    assert main_simulate(["--model", "gpt-8.3b", "--memory", "16GiB"]) == 1
    assert "even with full recomputation" in capsys.readouterr().out


def test_cli_writes_a_chrome_trace(tmp_path, capsys) -> None:
    import json

    path = tmp_path / "t.json"
    assert main_simulate(["--model", "gpt-1.5b", "--trace", str(path)]) == 0
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    assert {e["tid"] for e in events} == {0, 1, 2, 3}
    assert {e["cat"] for e in events} == {"F", "B", "R"}      # R: Merak's pre-recomputes


def test_parse_bytes() -> None:
    assert parse_bytes("40GiB") == 40 * 2**30
    assert parse_bytes("24GB") == 24e9
    assert parse_bytes("1e9") == 1e9
