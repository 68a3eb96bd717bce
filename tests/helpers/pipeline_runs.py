"""Several fits of ``tests/scripts/pipeline_fit.py`` in one launch, and groups of such launches shared by tests.

Starting torch and Lightning on every process costs more than these tiny fits, so tests that need runs on the
same number of processes share one launch and each asserts on its own runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from tests.helpers.launch import REPO, check_script


def run_merak_many(root: Path, devices: int, runs: dict[str, dict], timeout: float = 300) -> dict[str, list[dict]]:
    """Runs given as ``run_merak``'s keyword arguments but ``devices``, one after another in one launch of
    ``devices`` processes. Per run: every rank's results; its output (every rank's, captured during that run
    only) in ``root/NAME/output.txt``."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = {"devices": devices, "runs": runs}
    (root / "output.txt").write_text(check_script(REPO / "tests/scripts/pipeline_fit.py", str(root), json.dumps(cfg),
                                                  timeout=timeout))
    results = {}
    for name in runs:
        folder = root / name
        (folder / "output.txt").write_text("".join((folder / f"output.rank{r}.txt").read_text()
                                                   for r in range(devices)))
        results[name] = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(devices)]
    return results


# A group: (processes, its runs by name given the shared root folder, groups whose files it reads first)
Group = tuple[int, Callable[[Path], dict[str, dict]], tuple[str, ...]]


class Launches:
    """Runs by name, each group launched once, when a test first asks for one of its runs (so a test's time
    limit covers only the launches it needs). Group G writes under ``root/G``; a run's output is ``output(name)``.
    A failed launch fails every later test of its group at once, with the same error."""

    def __init__(self, root: Path, groups: dict[str, Group]) -> None:
        self.root, self.groups, self.results = root, groups, {}
        self.group_of = {name: group for group, (_, runs, _) in groups.items() for name in runs(root)}

    def folder(self, group: str) -> Path:
        return self.root / group

    def output(self, name: str) -> str:
        """What every rank printed during the run."""
        self[name]
        return (self.folder(self.group_of[name]) / name / "output.txt").read_text()

    def __getitem__(self, name: str) -> list[dict]:
        return self.launch(self.group_of[name])[name]

    def launch(self, group: str) -> dict[str, list[dict]]:
        if group not in self.results:
            devices, runs, needs = self.groups[group]
            try:
                for other in needs:
                    self.launch(other)
                self.results[group] = run_merak_many(self.folder(group), devices, runs(self.root))
            except RuntimeError as err:
                self.results[group] = err
                raise
        if isinstance(self.results[group], RuntimeError):
            raise RuntimeError(f"the launch of group {group!r} failed:\n{self.results[group]}")
        return self.results[group]
