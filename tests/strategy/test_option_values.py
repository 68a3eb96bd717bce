"""Sizes and paths that look like options but are not: each fails at ``MerakStrategy(...)``, naming the value."""

from __future__ import annotations

import pytest

from lightning_merak import MerakConfigError, MerakStrategy
from lightning_merak.config import parse_bytes


@pytest.mark.parametrize(("value", "message"), [
    (0.5, "memory_budget=0.5 must be at least one byte"),
    (-1, "memory_budget=-1 must be at least one byte"),
    ("-1GB", "memory_budget='-1GB' cannot be parsed"),
    (float("inf"), "memory_budget=inf is not a finite size"),
    ("inf", "memory_budget='inf' cannot be parsed"),
    ("nan", "memory_budget='nan' cannot be parsed"),
    (float("nan"), "memory_budget=nan is not a finite size"),
    ("1e400", "memory_budget='1e400' is not a finite size"),
    ("1e-3", "memory_budget='1e-3' must be at least one byte"),
    ("20 parsecs", "memory_budget='20 parsecs' cannot be parsed"),
    ([20], r"memory_budget=\[20\] is not a size"),
])
def test_bad_memory_budget_named_at_construction(value, message):
    with pytest.raises(MerakConfigError, match=message):
        MerakStrategy(memory_manager="delta", memory_budget=value)


def test_budget_with_a_space_before_the_unit_is_accepted():
    assert parse_bytes("20 GB") == 20 * 10**9
    assert parse_bytes(" 1.5 GiB ") == int(1.5 * 2**30)
    assert parse_bytes("2e3kb") == 2 * 10**6
    assert MerakStrategy(memory_manager="delta", memory_budget="20 GB").config.budget_bytes == 20 * 10**9


def test_trace_dir_under_a_regular_file(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    bad = blocker / "traces"
    with pytest.raises(MerakConfigError, match=f"trace_dir='{bad}' cannot be created: {blocker} is a file"):
        MerakStrategy(trace_dir=str(bad))
    with pytest.raises(MerakConfigError, match="trace_dir=3 is not a folder path"):
        MerakStrategy(trace_dir=3)
    assert not (tmp_path / "fresh").exists()
    MerakStrategy(trace_dir=str(tmp_path / "fresh" / "traces"))  # a missing folder is made later, not now
    assert not (tmp_path / "fresh").exists()
