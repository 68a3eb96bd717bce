"""One validated options object for MerakStrategy.

Every option is checked here, once, before any process group or model work starts. Each error names the
value that was wrong and says what to use instead.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field

from lightning_merak.pipeline.plan.schedules import (
    SCHEDULE_NAMES,
    SCHEDULE_OPTIONS,
    ScheduleError,
    make_schedule,
    spec,
)

RNG_MODES = ("torch", "microbatch")
BATCH_LOSS_MODES = ("auto", "whole", "microbatch")
RECOMPUTE_MODES = ("stage_aware", "none", "full")
MEMORY_MANAGERS = ("none", "delta")
ZERO_STAGES = (0, 1, 2)
SUPPORTED_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true")

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class MerakConfigError(ValueError):
    """A MerakStrategy option is invalid; the message says which and what to do."""


def parse_bytes(value: int | float | str | None, option: str = "memory_budget") -> int | None:
    """Turn ``20GiB`` / ``20 GB`` / ``1.5e9`` / ``512MB`` into bytes; ``None`` stays ``None``.

    A budget is a whole, finite number of bytes >= 1: ``0.5``, ``-1``, ``inf``, ``nan`` and ``1e400`` (which
    overflows to infinity) are refused, naming the value, instead of becoming a zero or an overflow later.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise MerakConfigError(f"{option}={value!r} is not a size; give bytes (int) or a string like '20GiB'.")
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if not match or match.group(2).lower() not in _UNITS:
            raise MerakConfigError(
                f"{option}={value!r} cannot be parsed as a size. Use bytes (e.g. 21474836480) or a number with a "
                f"unit from {sorted(k for k in _UNITS if k)} (e.g. '20GiB', '512MB')."
            )
        number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    else:
        number = value
    if not math.isfinite(number):
        raise MerakConfigError(f"{option}={value!r} is not a finite size: give a number of bytes per device "
                               "(e.g. '20GiB'), or leave it unset.")
    if number < 1:
        raise MerakConfigError(f"{option}={value!r} must be at least one byte per device (e.g. '20GiB'); a "
                               "fraction or a negative number is not a budget.")
    return int(number)


def _check_folder(option: str, folder: object) -> None:
    """An output folder (``trace_dir``, ``swap_dir``) must be creatable and writable: found now, not after the
    first step."""
    if folder is None:
        return
    if not isinstance(folder, (str, os.PathLike)) or not str(folder):
        raise MerakConfigError(f"{option}={folder!r} is not a folder path; give a path (str) or None.")
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):  # the nearest existing ancestor is where the folder would be made
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise MerakConfigError(f"{option}={folder!r} cannot be created: {existing} is a file, not a folder. "
                               "Give a folder path (it is created if missing).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MerakConfigError(f"{option}={folder!r} cannot be written: {existing} is not writable by this "
                               "user. Give a folder you can write to.")


def _check_size(name: str, value: object, allow_auto: bool = False) -> None:
    if allow_auto and value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = "an integer >= 1 or 'auto'" if allow_auto else "an integer >= 1"
        raise MerakConfigError(f"{name}={value!r} is invalid: give {hint}.")


@dataclass
class MerakConfig:
    """The strategy's options after validation (see MerakStrategy for their meaning)."""

    data_parallel_size: int | str = "auto"
    pipeline_parallel_size: int = 1
    tensor_parallel_size: int = 1
    num_microbatches: int | None = None
    pipeline_schedule: str = "auto"
    partition: str | list[str] = "auto"
    recompute: str | float = "stage_aware"
    subtensor_chunks: int = 2
    memory_manager: str = "none"
    memory_budget: int | str | None = None
    pipeline_module: str = "auto"
    trace_dir: str | None = None
    rng: str = "torch"
    zero_stage: int = 0
    batch_loss: str = "auto"
    swap_dir: str | None = None
    budget_bytes: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        _check_size("data_parallel_size", self.data_parallel_size, allow_auto=True)
        _check_size("pipeline_parallel_size", self.pipeline_parallel_size)
        _check_size("tensor_parallel_size", self.tensor_parallel_size)
        _check_size("subtensor_chunks", self.subtensor_chunks)
        if self.num_microbatches is not None:
            _check_size("num_microbatches", self.num_microbatches)
        if self.pipeline_schedule not in SCHEDULE_OPTIONS:
            raise MerakConfigError(
                f"pipeline_schedule={self.pipeline_schedule!r} is unknown; choose one of {list(SCHEDULE_OPTIONS)}."
            )
        if isinstance(self.recompute, bool) or (
            not isinstance(self.recompute, (int, float)) and self.recompute not in RECOMPUTE_MODES
        ):
            raise MerakConfigError(
                f"recompute={self.recompute!r} is unknown; choose one of {list(RECOMPUTE_MODES)} or a float in "
                "[0, 1] (Merak's first-stage recompute ratio)."
            )
        if isinstance(self.recompute, (int, float)) and not 0.0 <= float(self.recompute) <= 1.0:
            raise MerakConfigError(f"recompute={self.recompute!r}: a ratio must lie in [0, 1].")
        if self.memory_manager not in MEMORY_MANAGERS:
            raise MerakConfigError(
                f"memory_manager={self.memory_manager!r} is unknown; choose one of {list(MEMORY_MANAGERS)}."
            )
        if self.rng not in RNG_MODES:
            raise MerakConfigError(
                f"rng={self.rng!r} is unknown; choose 'torch' (torch's generators as they are) or 'microbatch' "
                "(streams per micro-batch and module: dropout masks independent of the parallel layout)."
            )
        if self.batch_loss not in BATCH_LOSS_MODES:
            raise MerakConfigError(
                f"batch_loss={self.batch_loss!r} is unknown; choose 'auto' (the first step compares the whole-batch "
                "loss with the mean of the micro-batch losses), 'whole' (the last pipeline stage computes the loss "
                "once over every micro-batch) or 'microbatch' (one loss per micro-batch, averaged)."
            )
        self._check_zero()
        self.budget_bytes = parse_bytes(self.memory_budget)
        _check_folder("trace_dir", self.trace_dir)
        _check_folder("swap_dir", self.swap_dir)
        if self.swap_dir is not None and self.memory_manager != "delta":
            raise MerakConfigError(f"swap_dir={self.swap_dir!r} is set but nothing uses it: it is where DELTA "
                                   "swaps activations on CPU-only runs. Set memory_manager='delta', or drop swap_dir.")
        self._check_schedule_rules()
        if self.memory_manager == "delta" and self.pipeline_schedule != "auto" and self.stages_per_rank > 1 \
                and self.pipeline_parallel_size > 1:
            raise MerakConfigError(
                f"memory_manager='delta' with pipeline_schedule={self.pipeline_schedule!r} is not supported: DELTA "
                "manages one stage per rank, these schedules place two. Use 'shifted_critical_path', '1f1b', "
                "'gpipe' or 'auto' with DELTA."
            )
        if self.budget_bytes is not None and self.memory_manager == "none" and (
            self.recompute != "stage_aware" or self.pipeline_parallel_size == 1
        ):
            raise MerakConfigError(
                f"memory_budget={self.memory_budget!r} is set but nothing uses it: set memory_manager='delta' "
                "(or, with a pipeline, recompute='stage_aware'), or drop memory_budget."
            )
        if self.partition != "auto" and not (
            isinstance(self.partition, (list, tuple)) and all(isinstance(p, str) for p in self.partition)
        ):
            raise MerakConfigError(
                f"partition={self.partition!r} is invalid: give 'auto' or a list of module names where stages "
                "1.. begin (e.g. ['model.transformer.h.4'])."
            )
        if isinstance(self.partition, (list, tuple)):
            self.partition = list(self.partition)
            pp = self.pipeline_parallel_size
            if self.pipeline_schedule == "auto":
                allowed = [pp * k - 1 for k in ((1,) if self.memory_manager == "delta" else (1, 2))]
                if len(self.partition) not in allowed:
                    raise MerakConfigError(
                        f"partition lists {len(self.partition)} boundaries but pipeline_parallel_size={pp} with "
                        f"pipeline_schedule='auto' needs {' or '.join(map(str, allowed))} (where stages 1.. begin; "
                        f"{2 * pp - 1} places two stages on each rank)."
                    )
            elif len(self.partition) != pp * self.stages_per_rank - 1:
                stages = pp * self.stages_per_rank
                raise MerakConfigError(
                    f"partition lists {len(self.partition)} boundaries but pipeline_parallel_size="
                    f"{pp} with pipeline_schedule={self.pipeline_schedule!r} makes {stages} "
                    f"stages, so it needs {stages - 1} (where stages 1.. begin)."
                )
        if self.pipeline_schedule == "auto" and self.pipeline_parallel_size > 1 and not self.schedule_candidates():
            raise MerakConfigError(  # gpipe and 1f1b run any count: only a hand-written 2p-stage cut gets here
                f"pipeline_schedule='auto' has no schedule that can run num_microbatches="
                f"{self.microbatches(self.pipeline_parallel_size)} on pipeline_parallel_size="
                f"{self.pipeline_parallel_size} with the stages of partition={self.partition!r}; use more "
                "micro-batches or a partition of one stage per rank."
            )

    def _check_zero(self) -> None:
        if not isinstance(self.zero_stage, int) or isinstance(self.zero_stage, bool) or self.zero_stage not in ZERO_STAGES:
            raise MerakConfigError(
                f"zero_stage={self.zero_stage!r} is invalid: give 0 (replicated optimizer, DDP), 1 (optimizer state "
                "sharded over the data-parallel replicas) or 2 (gradients sharded too)."
            )
        if self.zero_stage == 2 and self.pipeline_parallel_size > 1:
            raise MerakConfigError(
                f"zero_stage=2 with pipeline_parallel_size={self.pipeline_parallel_size} is not supported: a pipeline "
                "accumulates every micro-batch's gradients on its stage until the step, so sharding them at the "
                "sync point does not lower its peak memory (DeepSpeed refuses ZeRO-2 with its pipeline too). "
                "Use zero_stage=1 with a pipeline."
            )

    def warn_zero_without_replicas(self, dp: int) -> None:
        """zero_stage > 0 shards over the data-parallel replicas: with one it does nothing (say so)."""
        if self.zero_stage > 0 and dp == 1:
            warnings.warn(
                f"zero_stage={self.zero_stage} does nothing with data_parallel_size=1: ZeRO shards optimizer state "
                "(and gradients) over the data-parallel replicas. Add replicas or drop zero_stage.", stacklevel=2,
            )

    def _check_schedule_rules(self) -> None:
        """The schedule's micro-batch rules, at ``Trainer(...)`` time rather than after the processes started
        ("auto" checks them per candidate: ``schedule_candidates``)."""
        pp = self.pipeline_parallel_size
        if pp == 1 or self.pipeline_schedule == "auto":
            return
        try:
            make_schedule(self.pipeline_schedule, pp, self.microbatches(pp))
        except ScheduleError as err:
            raise MerakConfigError(
                f"pipeline_schedule={self.pipeline_schedule!r} cannot run num_microbatches={self.microbatches(pp)} on "
                f"pipeline_parallel_size={pp}: {err} (pipeline_schedule='auto' picks a schedule that can.)"
            ) from None

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages on each pipeline rank for a named schedule: two for interleaved and V placements
        (under "auto" the build recipe decides among ``placements``; this reports the first)."""
        if self.pipeline_schedule == "auto":
            return self.placements[0]
        return spec(self.pipeline_schedule).stages_per_rank

    @property
    def placements(self) -> tuple[int, ...]:
        """The stages-per-rank placements the schedule may use: "auto" weighs one and two per rank, except
        where DELTA (one stage per rank) or a hand-written partition (its length) fixes it."""
        if self.pipeline_schedule != "auto":
            return (spec(self.pipeline_schedule).stages_per_rank,)
        options = (1,) if self.memory_manager == "delta" else (1, 2)
        if isinstance(self.partition, list):
            options = tuple(k for k in options if self.pipeline_parallel_size * k - 1 == len(self.partition))
        return options

    def schedule_candidates(self) -> tuple[str, ...]:
        """The schedules this configuration may run: the named one, or for "auto" every schedule of an allowed
        placement whose micro-batch rules hold for this pipeline size and micro-batch count."""
        if self.pipeline_schedule != "auto":
            return (self.pipeline_schedule,)
        pp = self.pipeline_parallel_size
        names = []
        for name in SCHEDULE_NAMES:
            if spec(name).stages_per_rank not in self.placements:
                continue
            try:
                make_schedule(name, pp, self.microbatches(pp))
            except ScheduleError:
                continue
            names.append(name)
        return tuple(names)

    def resolve_world(self, world_size: int) -> tuple[int, int, int]:
        """Return (dp, pp, tp) for ``world_size`` processes, or raise naming the mismatch."""
        pp, tp = self.pipeline_parallel_size, self.tensor_parallel_size
        if world_size % (pp * tp) != 0:
            raise MerakConfigError(
                f"world size {world_size} is not divisible by pipeline_parallel_size x tensor_parallel_size = "
                f"{pp} x {tp} = {pp * tp}. Use a number of devices (devices x num_nodes) that is a multiple of "
                f"{pp * tp}, or change the parallel sizes."
            )
        dp = world_size // (pp * tp)
        if self.data_parallel_size != "auto" and self.data_parallel_size != dp:
            raise MerakConfigError(
                f"data_parallel_size={self.data_parallel_size} x pipeline_parallel_size={pp} x "
                f"tensor_parallel_size={tp} = {self.data_parallel_size * pp * tp} does not equal the world size "
                f"{world_size}. Set data_parallel_size='auto' (gives {dp}) or change devices/num_nodes."
            )
        return dp, pp, tp

    def microbatches(self, pp: int) -> int:
        """Default: 2 x pp micro-batches for pipelines (enough to fill 1F1B), 1 without a pipeline."""
        if self.num_microbatches is not None:
            return self.num_microbatches
        return 1 if pp == 1 else 2 * pp


def check_precision(precision: str) -> None:
    """Precisions the micro-batched step supports; fp16 needs a GradScaler the pipeline step bypasses."""
    if str(precision) not in SUPPORTED_PRECISIONS:
        raise MerakConfigError(
            f"precision={precision!r} is not supported by MerakStrategy: the pipelined step runs backward itself, "
            f"so fp16 loss scaling (GradScaler) and 64-bit are not wired in. Use one of {list(SUPPORTED_PRECISIONS)}."
        )
