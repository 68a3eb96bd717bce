"""Checkpoint files replaced by pickles that would run code: opening a file for writing creates it."""

from __future__ import annotations

import builtins
import pickle
from pathlib import Path

import torch


class CreatesFile:
    """Unpickling this calls ``open(path, "w")``: the file exists afterwards iff the pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def poison(file: Path, marker: Path) -> None:
    """Replace ``file`` with a pickle payload in the format a loader of that file expects."""
    if file.suffix == ".pt" or file.suffix == ".ckpt":
        torch.save({"epoch": 0, "payload": CreatesFile(marker)}, file)
    else:
        file.write_bytes(pickle.dumps(CreatesFile(marker)))


def non_shard_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix != ".distcp")
