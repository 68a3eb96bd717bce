"""The engines the strategy delegates every step to: ``PipelineEngine`` (pp > 1) and ``LocalEngine`` (pp = 1).

An engine is built from explicit arguments by ``parallelize.build_engine`` and never holds the strategy.
Each step returns a ``StepResult`` (what Lightning gets back, the logs to replay); ``end_step`` after the
optimizer step returns the memory figures to log. The strategy does the Lightning parts: data-parallel
gradient sync, logging, checkpoints.

Training under a pipeline uses torch's ``PipelineStage`` and a schedule (``runtime.build_schedule``) fed by
``StageRunner``; evaluation runs a forward-only pipeline of one micro-batch with plain point-to-point
transfers, so the user's ``validation_step``/``test_step``/``predict_step`` sees the whole batch exactly as in
one process.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.distributed.pipelining import PipelineStage

from lightning_merak import failures
from lightning_merak._compat import local_shard
from lightning_merak.pipeline.plan.choose import ScheduleDecision
from lightning_merak.pipeline.takeover import StageRunner, capture_model_call, redirect_forward, split_batch
from lightning_merak.trace import shape_signature
from lightning_merak.units import format_bytes

log = logging.getLogger(__name__)

TRACED_STEPS = 5  # real-run timelines are written for the first steps only (one JSON file per step)
AUTO_MEASURED_STEP = 1  # "auto" re-chooses from this step's times (step 0 warms up allocators and caches)
SCHEDULE_CACHE = 8  # schedules kept per input-shape signature (least recently used dropped first)


@dataclass(frozen=True)
class StepContext:
    """What an engine needs to know about the Trainer's step (the strategy reads it off Lightning)."""

    batch_idx: int
    global_step: int
    starts_window: bool  # first batch of an accumulation window: gradients start from zero
    loss_scale: float  # 1 / accumulate_grad_batches
    rng_batch: int  # the batch's position in the run, for micro-batch RNG streams


@dataclass
class StepResult:
    """One step's outcome: ``output`` goes back to Lightning; ``logs`` are replayed on this rank."""

    output: Any
    logs: dict[str, tuple[Any, dict]] = field(default_factory=dict)


class LocalEngine:
    """pp = 1: the user's step runs as written; Lightning runs backward. Carries DELTA and RNG streams."""

    runs_backward = False

    def __init__(self, lightning_module: Any, delta: Any = None, rng: Any = None) -> None:
        self.lightning_module = lightning_module
        self.delta = delta
        self.rng = rng

    def training_step(self, ctx: StepContext, *args: Any, **kwargs: Any) -> StepResult:
        if self.rng is not None:  # one micro-batch per step without a pipeline
            self.rng.start(ctx.rng_batch)
        if self.delta is None:
            return StepResult(self.lightning_module.training_step(*args, **kwargs))
        with self.delta.forward():
            return StepResult(self.lightning_module.training_step(*args, **kwargs))

    def eval_step(self, hook: str, *args: Any, **kwargs: Any) -> StepResult:
        return StepResult(getattr(self.lightning_module, hook)(*args, **kwargs))

    def end_step(self, global_step: int) -> dict[str, float]:
        return self.delta.end_step() if self.delta is not None else {}

    def memory_report(self, rank: int) -> str | None:
        return None if self.delta is None else f"DELTA memory ledger (rank {rank}):\n{self.delta.ledger.summary_table()}"

    def stage_of_parameters(self) -> dict[int, int] | None:
        return None

    def tied_copies(self) -> set[int]:
        return set()

    def attach(self) -> None:
        """Install DELTA and the RNG streams (again, for a later validate/test after ``teardown``)."""
        if self.rng is not None:
            self.rng.install()
        if self.delta is not None:
            self.delta.attach()

    def teardown(self) -> None:
        """End of a Trainer run: remove every hook this engine installed (``attach`` puts them back)."""
        if self.rng is not None:
            self.rng.remove()
        if self.delta is not None:
            self.delta.close()


class PipelineEngine:
    """pp > 1: this rank's stages inside Lightning's loops (training, validation, test, predict)."""

    runs_backward = True

    def __init__(self, lightning_module: Any, pipelined: nn.Module, stage_modules: list[Any], *,
                 pp_group: dist.ProcessGroup, device: torch.device, num_microbatches: int,
                 stage_to_rank: tuple[int, ...], auto: Any, schedule_name: str, tied_groups: list[Any],
                 delta: Any = None, rng: Any = None, pre_checkpoint: bool = True,
                 trace_dir: str | None = None) -> None:
        self.lightning_module = lightning_module
        self.pipelined = pipelined
        self.stage_modules = stage_modules  # this rank's stages, in stage order (two for interleaved / V)
        self.pp_group = pp_group
        self.pp_size = dist.get_world_size(pp_group)
        self.pp_rank = dist.get_rank(pp_group)
        self.device = device
        self.num_microbatches = num_microbatches
        self.stage_to_rank = stage_to_rank
        self.num_stages = len(stage_to_rank)
        last = self.num_stages - 1
        self.holds_last = any(m.stage_index == last for m in stage_modules)
        self.last_rank = dist.get_global_rank(pp_group, stage_to_rank[last])
        self.runners = [StageRunner(m, pipelined, lightning_module, m.stage_index == last, delta)
                        for m in stage_modules]
        self.last_runner = next((r for r in self.runners if r.is_last), self.runners[-1])
        self.auto = auto  # AutoSchedule: re-chooses from measured times when it ``reselects``
        self.tied_groups = tied_groups  # [(group, params, counted)] summed across the stages that hold them
        self.delta = delta
        self.rng = rng
        # Merak's pre-checkpointed cool-down forwards are recomputation too: none of it with recompute="none"
        self.pre_checkpoint = pre_checkpoint
        self.trace_dir = trace_dir
        self._schedules: OrderedDict[tuple, Any] = OrderedDict()
        self._last_schedule: Any = None
        self._delta_reported = False
        self.use_schedule(schedule_name)

    # ------------------------------------------------------------------ schedule
    def use_schedule(self, name: str) -> None:
        """Run ``name`` from the next step on, with the ratios ``self.auto`` decided (one per stage)."""
        from lightning_merak.pipeline.plan.schedules import spec

        self.schedule_name = name
        for stage in self.stage_modules:
            stage.split_backward = spec(name).splits_backward
            stage.checkpoint_ratio(self.auto.ratios[stage.stage_index])
        self._schedules.clear()

    def _schedule_for(self, signature: tuple, metas: list[tuple[tuple, tuple]]) -> Any:
        if signature in self._schedules:
            self._schedules.move_to_end(signature)
            return self._schedules[signature]
        from lightning_merak.pipeline.plan.schedules import spec
        from lightning_merak.pipeline.runtime import build_schedule

        stages = []
        for runner, (recv, send) in zip(self.runners, metas, strict=True):
            # activations carry gradients: the receive buffers PipelineStage makes from these must require grad
            stages.append(PipelineStage(runner, runner.stage.stage_index, self.num_stages, self.device,
                                        input_args=tuple(_example(t) for t in recv),
                                        output_args=tuple(_example(t) for t in send), group=self.pp_group))
        table = None if self.pre_checkpoint or not spec(self.schedule_name).pre_checkpoints else ()
        schedule = build_schedule(self.schedule_name, stages if len(stages) > 1 else stages[0],
                                  self.num_microbatches, loss_fn=_identity_loss, recompute_table=table,
                                  record_timeline=self.trace_dir is not None or self.auto.reselects)
        self._schedules[signature] = schedule
        if len(self._schedules) > SCHEDULE_CACHE:
            self._schedules.popitem(last=False)
        return schedule

    # ------------------------------------------------------------------ training
    def training_step(self, ctx: StepContext, batch: Any, batch_idx: int, *args: Any) -> StepResult:
        if ctx.starts_window:  # Lightning's zero_grad is skipped with its backward: the schedule accumulates
            for p in self.lightning_module.parameters():
                p.grad = None
        step = self.lightning_module.training_step
        micro = split_batch(batch, self.num_microbatches)
        # a rank holding only the last stage re-runs the user's step itself: it needs only the first micro-batch's
        # shapes
        only_last = self.holds_last and len(self.runners) == 1
        inputs = []
        for j, mb in enumerate(micro[:1] if only_last else micro):
            if self.rng is not None:  # the user's step before the model call draws as it does in the runner
                self.rng.start(ctx.rng_batch, j, self.num_microbatches)
            inputs.append(capture_model_call(step, self.pipelined, self.lightning_module, mb, batch_idx, *args))
        for runner in self.runners:
            runner.inputs, runner.weights = inputs, [1.0 / self.num_microbatches] * self.num_microbatches
            runner.rng, runner.batch_index = self.rng, ctx.rng_batch
            runner.loss_scale = ctx.loss_scale
        self.last_runner.steps = [lambda mb=mb: step(mb, batch_idx, *args) for mb in micro]
        self.last_runner.step_outputs = []
        metas = [m.boundary_metas(*inputs[0]) for m in self.stage_modules]
        schedule = self._schedule_for(shape_signature(*inputs[0]), metas)
        index = torch.arange(self.num_microbatches)
        if self.holds_last:
            schedule.step(mb=index, target=index, losses=[], return_outputs=False)
        else:
            schedule.step(mb=index)
        self._sum_tied_grads()
        self._last_schedule = schedule
        if self.trace_dir is not None:
            self._write_timeline(schedule, ctx.global_step)
        return self._finish_step()

    def end_step(self, global_step: int) -> dict[str, float]:
        """After the optimizer step: "auto"'s re-choice once, and every stage's DELTA ledger as metrics."""
        if self.auto.reselects and global_step >= AUTO_MEASURED_STEP and self._last_schedule is not None:
            self._choose_from_measurements(self._last_schedule, global_step)
        return self._memory_figures(self.delta.end_step()) if self.delta is not None else {}

    def _memory_figures(self, stats: dict[str, float]) -> dict[str, float]:
        """``delta/<name>/stage<i>`` for every stage; once DELTA has planned, one line saying what it decided per
        stage (its keep / swap / recompute is the pipeline's stage-aware recomputation)."""
        per_stage: list[Any] = [None] * self.pp_size
        dist.all_gather_object(per_stage, stats, group=self.pp_group)
        if not self._delta_reported and not any(st["delta/profiling"] for st in per_stage):
            self._delta_reported = True
            rank_zero_info("Merak + DELTA, first planned step per stage: " + "; ".join(
                f"stage {i} keeps {format_bytes(st['delta/kept_bytes'])}, swaps {format_bytes(st['delta/swapped_bytes'])}, "
                f"recomputes {format_bytes(st['delta/recomputed_bytes'])} (peak {format_bytes(st['delta/peak_bytes'])} of "
                f"{format_bytes(st['delta/allowance_bytes'])})" for i, st in enumerate(per_stage)))
        return {f"{k}/stage{i}": v for i, st in enumerate(per_stage) for k, v in st.items()}

    def _choose_from_measurements(self, schedule: Any, global_step: int) -> None:
        """Re-run ``auto``'s choice with this step's measured stage times (rank 0's pipeline decides for all
        replicas), then rebuild the schedules with the new schedule and recompute ratios."""
        events: list[Any] = [None] * self.pp_size
        dist.all_gather_object(events, schedule.timeline_events, group=self.pp_group)

        def decide() -> tuple[str, tuple[float, ...], str]:
            decision = self.auto.remeasured([e for rank_events in events for e in rank_events], global_step)
            return decision.name, decision.ratios, decision.reason

        # on rank 0 alone while the others wait in the broadcast: an error there is raised on every rank
        name, ratios, reason = failures.rank_local(decide, "pipeline_schedule='auto''s re-choice",
                                                   runs=dist.get_rank() == 0)
        rank_zero_info(f"Merak pipeline_schedule='auto', {reason}")
        self.auto.settle(ScheduleDecision(name, tuple(ratios), reason))
        self.use_schedule(name)

    def _write_timeline(self, schedule: Any, step: int) -> None:
        """Gather every rank's (action, start, end) records of this step to rank 0 as a Chrome trace."""
        if step >= TRACED_STEPS:
            return
        from lightning_merak.pipeline.plan.timeline import write_chrome_trace

        events = [dict(e, rank=dist.get_rank()) for e in schedule.timeline_events]
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(events, gathered, dst=0)
        if gathered is not None:
            path = Path(self.trace_dir) / f"pipeline_step{step}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_chrome_trace([e for rank_events in gathered for e in rank_events], path,
                               name=f"{self.schedule_name} step {step}")

    def _finish_step(self) -> StepResult:
        """Broadcast the batch loss and the logged values from the last stage, for every rank to replay."""
        payload = [None]
        if self.holds_last:
            runner = self.last_runner
            losses = [o["loss"] if isinstance(o, dict) else o for o in runner.step_outputs]
            loss = sum(float(v.detach()) * w for v, w in zip(losses, runner.weights, strict=True))
            payload = [(loss, runner.recorder.summary(self.lightning_module))]
        dist.broadcast_object_list(payload, src=self.last_rank, group=self.pp_group)
        loss, logged = payload[0]
        return StepResult(torch.tensor(loss, device=self.device), logged)

    def stage_of_parameters(self) -> dict[int, int] | None:
        """id(parameter) -> the stage holding it (this rank holds two under interleaved / V schedules)."""
        return {id(p): m.stage_index for m in self.stage_modules for p in m.own_parameters()}

    def tied_copies(self) -> set[int]:
        """Ids of this rank's tied-weight copies that another stage's copy already stands for in a norm."""
        return {id(p) for _, params, counted in self.tied_groups if not counted for p in params}

    def _sum_tied_grads(self) -> None:
        """Each copy of a tied weight gets the sum of every copy's gradient. Under TP the copies are sharded alike
        (vocab rows); a gradient whose placement differs from its weight's (an embedding's is replicated) is
        first laid out as the weight is, so the holders add up the same rows."""
        for group, params, _ in self.tied_groups:
            for p in params:
                if p.grad is None:
                    continue
                placements = getattr(p, "placements", None)
                if placements is not None and p.grad.placements != placements:
                    p.grad = p.grad.redistribute(p.device_mesh, placements)
                dist.all_reduce(local_shard(p.grad), group=group)

    def memory_report(self, rank: int) -> str | None:
        if self.delta is None:
            return None
        return (f"DELTA memory ledger (rank {rank}, pipeline stage {self.stage_modules[0].stage_index}):\n"
                f"{self.delta.ledger.summary_table()}")

    def attach(self) -> None:
        """Install the stage dispatch and hooks, DELTA and the RNG streams (again after ``teardown``)."""
        self.stage_modules[0].shared.install()
        if self.rng is not None:
            self.rng.install()
        if self.delta is not None:
            self.delta.attach()

    def teardown(self) -> None:
        """End of a Trainer run: drop cached schedules and remove every hook and forward wrapper this engine
        installed, so the module is left as the cut made it (pruned to this rank's stages); ``attach`` puts
        them back for a later validate/test with the same strategy."""
        self._schedules.clear()
        self._last_schedule = None
        self.stage_modules[0].shared.remove()
        if self.rng is not None:
            self.rng.remove()
        if self.delta is not None:
            self.delta.close()

    # ------------------------------------------------------------------ evaluation
    def eval_step(self, hook: str, batch: Any, batch_idx: int, *args: Any) -> StepResult:
        """Forward-only pipeline of one micro-batch through the stages in order: receive, run, send; the rank
        holding the last stage runs the user's hook."""
        step = getattr(self.lightning_module, hook)
        model_args, model_kwargs = capture_model_call(step, self.pipelined, self.lightning_module, batch, batch_idx,
                                                      *args)
        result, outputs = None, ()
        with torch.no_grad():
            for stage in self.stage_modules:
                i = stage.stage_index
                received = outputs  # from this rank's previous stage, or received below
                if i > 0 and self.stage_to_rank[i - 1] != self.pp_rank:
                    recv_metas, _ = stage.boundary_metas(model_args, model_kwargs)
                    received = tuple(self._recv(meta, self.stage_to_rank[i - 1]) for meta in recv_metas)
                if i < self.num_stages - 1:
                    outputs = stage(*received, model_args=model_args, model_kwargs=model_kwargs)
                    if self.stage_to_rank[i + 1] != self.pp_rank:
                        dst = dist.get_global_rank(self.pp_group, self.stage_to_rank[i + 1])
                        for t in outputs:
                            dist.send(t, dst=dst, group=self.pp_group)  # stage outputs are contiguous
                    continue

                def run_stage(*a: Any, _stage=stage, _received=received, **kw: Any) -> Any:
                    return _stage(*_received, model_args=a, model_kwargs=kw)

                with redirect_forward(self.pipelined, run_stage), \
                        self.last_runner.recorder.recording(self.lightning_module, 1.0):
                    result = step(batch, batch_idx, *args)
        payload = [(result, self.last_runner.recorder.summary(self.lightning_module)) if self.holds_last else None]
        dist.broadcast_object_list(payload, src=self.last_rank, group=self.pp_group)
        result, logged = payload[0]
        return StepResult(result, logged)

    def _recv(self, meta: torch.Tensor, pp_rank: int) -> torch.Tensor:
        buf = torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
        dist.recv(buf, src=dist.get_global_rank(self.pp_group, pp_rank), group=self.pp_group)
        return buf


def _example(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta").requires_grad_(t.is_floating_point())


def _identity_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The last stage's runner already returns the (scaled) loss of the user's step."""
    return output
