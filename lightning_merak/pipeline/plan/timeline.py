"""Timelines: Chrome-trace JSON (opens in Perfetto / chrome://tracing) and a matplotlib Gantt chart.

The same trace format serves simulated runs (``simulate(...).timeline``) and real ones: the strategy records
per-rank ``(action, start, end)`` and calls ``to_chrome_trace``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_merak.pipeline.plan.schedules import Action
from lightning_merak.pipeline.plan.simulate import Event

#: Colours per action kind (Chrome trace reserved colour names, and the same hues for the PNG).
_TRACE_COLOURS = {"F": "thread_state_running", "B": "thread_state_iowait", "I": "thread_state_iowait",
                  "W": "thread_state_sleeping", "R": "terrible"}
_PNG_COLOURS = {"F": "#4c9be8", "B": "#e8a24c", "I": "#e8a24c", "W": "#7ac77a", "R": "#d9534f"}


def _as_event(record: Any) -> tuple[int, str, str, float, float]:
    """(rank, kind, label, start, end) from a simulator ``Event`` or a real record.

    A real record is a mapping with ``rank``, ``action`` (e.g. "1B3" or "1F0pc"), ``start`` and ``end`` in
    seconds, or a tuple ``(rank, action, start, end)``.
    """
    if isinstance(record, Event):
        return record.rank, record.kind, record.label, record.start, record.end
    if isinstance(record, Mapping):
        rank, action, start, end = record["rank"], str(record["action"]), record["start"], record["end"]
    else:
        rank, action, start, end = record
        action = str(action)
    return int(rank), Action.parse(action).kind, action, float(start), float(end)


def to_chrome_trace(events: Iterable[Any], *, time_unit: float = 1.0, name: str = "pipeline") -> dict:
    """Chrome-trace dict: one process, one thread row per pipeline rank, one complete ("X") event per action.

    ``time_unit`` converts event times to seconds (1.0 for seconds, 1e-3 for milliseconds); the trace itself
    is in microseconds, as the format wants.
    """
    trace: list[dict] = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": name}}]
    ranks = set()
    for record in events:
        rank, kind, label, start, end = _as_event(record)
        ranks.add(rank)
        trace.append({"name": label, "cat": kind, "ph": "X", "pid": 0, "tid": rank,
                      "ts": start * time_unit * 1e6, "dur": max(0.0, end - start) * time_unit * 1e6,
                      "cname": _TRACE_COLOURS.get(kind, "generic_work"), "args": {"kind": kind}})
    for rank in sorted(ranks):
        trace.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"pp rank {rank}"}})
        trace.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": rank, "args": {"sort_index": rank}})
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


def write_chrome_trace(events: Iterable[Any], path: str | Path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_chrome_trace(events, **kwargs)))
    return path


def plot_gantt(events: Sequence[Any], path: str | Path, *, title: str = "") -> Path:
    """A PNG Gantt chart, one row per rank. Needs matplotlib (the ``examples`` extra), imported lazily."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # optional dependency
        raise ImportError("plot_gantt needs matplotlib: pip install 'lightning-merak[examples]'") from err
    rows = [_as_event(e) for e in events]
    n_ranks = max((r[0] for r in rows), default=0) + 1
    fig, ax = plt.subplots(figsize=(12, 0.6 * n_ranks + 1.2))
    for rank, kind, label, start, end in rows:
        ax.barh(rank, end - start, left=start, color=_PNG_COLOURS.get(kind, "#999999"), edgecolor="black", linewidth=0.3)
        if end - start > 0:
            ax.text((start + end) / 2, rank, label.lstrip("0123456789"), ha="center", va="center", fontsize=6)
    ax.set_yticks(range(n_ranks), [f"rank {r}" for r in range(n_ranks)])
    ax.invert_yaxis()
    ax.set_xlabel("time")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
