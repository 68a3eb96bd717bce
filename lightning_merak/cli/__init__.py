"""``lightning-merak plan | simulate | consolidate``: look at what the strategy would do, and merge checkpoints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USAGE = """lightning-merak <command> [options]

commands:
  plan         print the pipeline partition plan of a model (table or --json)
  simulate     project step time of Merak's schedule vs 1F1B + full recompute at paper scale
  consolidate  DIR OUT.ckpt: merge a sharded Merak checkpoint into one ordinary Lightning checkpoint
"""


def _consolidate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lightning-merak consolidate",
                                     description="Merge a sharded Merak checkpoint folder into one .ckpt file.")
    parser.add_argument("folder", type=Path, help="checkpoint folder written by MerakStrategy")
    parser.add_argument("output", type=Path, help="the .ckpt file to write")
    parser.add_argument("--trusted", action="store_true",
                        help="the folder is trusted: unpickle its non-tensor state in full (may run code from the "
                             "files; by default only tensors and plain data are loaded)")
    args = parser.parse_args(argv)
    from lightning_merak.checkpoint import CheckpointError, consolidate

    try:
        out = consolidate(args.folder, args.output, weights_only=False if args.trusted else None)
    except CheckpointError as err:
        print(f"lightning-merak consolidate: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "consolidate":
        return _consolidate(rest)
    if command == "plan":
        from lightning_merak.cli.plan_command import main_plan

        return main_plan(rest)
    if command == "simulate":
        from lightning_merak.cli.projection import main_simulate

        return main_simulate(rest)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2

