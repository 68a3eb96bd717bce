"""PipelineEngine: runs one rank's stage inside Lightning's loops (training, validation, test, predict).

Training uses torch's ``PipelineStage`` and a schedule (``runtime.build_schedule``) fed by ``StageRunner``;
evaluation runs a forward-only pipeline of one micro-batch with plain point-to-point transfers, so the user's
``validation_step``/``test_step``/``predict_step`` sees the whole batch exactly as in one process.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.distributed.pipelining import PipelineStage

from lightning_merak._compat import skip_lightning_backward
from lightning_merak.pipeline.stage import shape_signature
from lightning_merak.pipeline.takeover import (
    StageRunner,
    capture_model_call,
    redirect_forward,
    replay_logs,
    split_batch,
)

log = logging.getLogger(__name__)

TRACED_STEPS = 5  # real-run timelines are written for the first steps only (one JSON file per step)
AUTO_MEASURED_STEP = 1  # "auto" re-chooses from this step's times (step 0 warms up allocators and caches)


class PipelineEngine:
    """Everything the strategy delegates to when ``pipeline_parallel_size > 1``."""

    def __init__(self, strategy: Any, lightning_module: Any, pipelined: nn.Module, stage_modules: list[nn.Module],
                 schedule_name: str, num_microbatches: int, tied_groups: list[Any], stage_to_rank: tuple[int, ...],
                 delta: Any = None, recompute_table: Any = None, auto: Any = None) -> None:
        self.strategy = strategy
        self.lightning_module = lightning_module
        self.pipelined = pipelined
        self.stage_modules = stage_modules  # this rank's stages, in stage order (two for interleaved / V)
        for stage in stage_modules:
            stage.split_backward = schedule_name == "zbv"
        self.schedule_name = schedule_name
        self.num_microbatches = num_microbatches
        mesh = strategy.device_mesh
        self.pp_group = mesh["pp"].get_group()
        self.pp_size = mesh["pp"].size()
        self.pp_rank = mesh["pp"].get_local_rank()
        self.stage_to_rank = stage_to_rank
        self.num_stages = len(stage_to_rank)
        last = self.num_stages - 1
        self.holds_last = any(m.stage_index == last for m in stage_modules)
        self.last_rank = dist.get_global_rank(self.pp_group, stage_to_rank[last])
        self.device = strategy.root_device
        self.runners = [StageRunner(m, pipelined, lightning_module, m.stage_index == last, delta)
                        for m in stage_modules]
        self.last_runner = next((r for r in self.runners if r.is_last), self.runners[-1])
        self.delta = delta
        self.recompute_table = recompute_table
        self.tied_groups = tied_groups  # [(group, params, counted)] summed across the stages that hold them
        self._schedules: dict[tuple, Any] = {}
        self.trace_dir = strategy.config.trace_dir
        self.auto = auto  # pipeline_schedule="auto": re-chosen from the times measured in an early step
        self._delta_reported = False

    # ------------------------------------------------------------------ lifecycle
    def on_train_start(self, trainer: Any) -> None:
        skip_lightning_backward(trainer)  # the schedule runs backward; see reference/lightning.md §7

    def teardown(self) -> None:
        self._schedules.clear()

    # ------------------------------------------------------------------ training
    def _schedule_for(self, signature: tuple, metas: list[tuple[tuple, tuple]]) -> Any:
        if signature not in self._schedules:
            from lightning_merak.pipeline.runtime import build_schedule

            stages = []
            for runner, (recv, send) in zip(self.runners, metas, strict=True):
                # activations carry gradients: the receive buffers PipelineStage makes from these must require grad
                stages.append(PipelineStage(runner, runner.stage.stage_index, self.num_stages, self.device,
                                            input_args=tuple(_example(t) for t in recv),
                                            output_args=tuple(_example(t) for t in send), group=self.pp_group))
            table = self.recompute_table if self.schedule_name == "shifted_critical_path" else None
            self._schedules[signature] = build_schedule(self.schedule_name, stages if len(stages) > 1 else stages[0],
                                                        self.num_microbatches, loss_fn=_identity_loss,
                                                        recompute_table=table,
                                                        record_timeline=self.trace_dir is not None
                                                        or self.auto is not None)
        return self._schedules[signature]

    def training_step(self, batch: Any, batch_idx: int, *args: Any) -> torch.Tensor:
        trainer = self.lightning_module.trainer
        accumulate = trainer.accumulate_grad_batches
        if batch_idx % accumulate == 0:
            for opt in trainer.optimizers:
                opt.zero_grad(set_to_none=True)
        step = self.lightning_module.training_step
        micro = split_batch(batch, self.num_microbatches)
        rng = self.strategy.rng_streams
        index_of_batch = 0
        if rng is not None:
            from lightning_merak.pipeline.rng import batch_index

            index_of_batch = batch_index(trainer, batch_idx)
        # a rank holding only the last stage re-runs the user's step itself: it needs only the first micro-batch's
        # shapes
        only_last = self.holds_last and len(self.runners) == 1
        inputs = []
        for j, mb in enumerate(micro[:1] if only_last else micro):
            if rng is not None:  # the user's step before the model call draws as it does in the runner
                rng.start(index_of_batch, j, self.num_microbatches)
            inputs.append(capture_model_call(step, self.pipelined, self.lightning_module, mb, batch_idx, *args))
        for runner in self.runners:
            runner.inputs, runner.weights = inputs, [1.0 / self.num_microbatches] * self.num_microbatches
            runner.rng, runner.batch_index = rng, index_of_batch
            runner.loss_scale = 1.0 / accumulate
        self.last_runner.steps = [lambda mb=mb: step(mb, batch_idx, *args) for mb in micro]
        self.last_runner.step_outputs = []
        metas = [m.boundary_metas(*inputs[0]) for m in self.stage_modules]
        schedule = self._schedule_for(shape_signature(*inputs[0]), metas)
        index = torch.arange(self.num_microbatches)
        losses: list[torch.Tensor] = []
        if self.holds_last:
            schedule.step(mb=index, target=index, losses=losses, return_outputs=False)
        else:
            schedule.step(mb=index)
        self._sum_tied_grads()
        if self.strategy._sync_grads:
            self.strategy.sync_data_parallel_grads()
        if self.trace_dir is not None:
            self._write_timeline(schedule, trainer.global_step)
        if self.auto is not None and trainer.global_step >= AUTO_MEASURED_STEP and self.strategy._sync_grads:
            self._choose_from_measurements(schedule)
        loss = self._finish_step()
        if self.delta is not None and self.strategy._sync_grads:
            self._log_memory(self.delta.end_step())
        return loss

    def _log_memory(self, stats: dict[str, float]) -> None:
        """Every stage's DELTA ledger as ``delta/<name>/stage<i>`` metrics; once DELTA has planned, one line saying
        what it decided per stage (its keep / swap / recompute is the pipeline's stage-aware recomputation)."""
        per_stage: list[Any] = [None] * self.pp_size
        dist.all_gather_object(per_stage, stats, group=self.pp_group)
        self.strategy.log_memory({f"{k}/stage{i}": v for i, st in enumerate(per_stage) for k, v in st.items()})
        if not self._delta_reported and not any(st["delta/profiling"] for st in per_stage):
            self._delta_reported = True
            mib = 2**20
            rank_zero_info("Merak + DELTA, first planned step per stage: " + "; ".join(
                f"stage {i} keeps {st['delta/kept_bytes'] / mib:.2f} MiB, swaps {st['delta/swapped_bytes'] / mib:.2f}"
                f" MiB, recomputes {st['delta/recomputed_bytes'] / mib:.2f} MiB (peak {st['delta/peak_bytes'] / mib:.2f}"
                f" of {st['delta/allowance_bytes'] / mib:.2f} MiB)" for i, st in enumerate(per_stage)))

    def _choose_from_measurements(self, schedule: Any) -> None:
        """Re-run ``auto``'s choice with this step's measured stage times (rank 0's pipeline decides for all
        replicas), then rebuild the schedules with the new schedule and recompute ratios."""
        events: list[Any] = [None] * self.pp_size
        dist.all_gather_object(events, schedule.timeline_events, group=self.pp_group)
        payload: list[Any] = [None]
        if dist.get_rank() == 0:
            choice = self.auto.choose([e for rank_events in events for e in rank_events])
            payload = [(choice.name, list(choice.ratios), choice.reason)]
        dist.broadcast_object_list(payload, src=0)
        name, ratios, reason = payload[0]
        rank_zero_info(f"Merak pipeline_schedule='auto', re-chosen from the times measured in step "
                       f"{AUTO_MEASURED_STEP}: {reason}")
        self.auto.apply(ratios)
        self.schedule_name, self.auto = name, None
        self._schedules.clear()

    def _write_timeline(self, schedule: Any, step: int) -> None:
        """Gather every rank's (action, start, end) records of this step to rank 0 as a Chrome trace."""
        if step >= TRACED_STEPS:
            return
        from lightning_merak.pipeline.timeline import write_chrome_trace

        events = [dict(e, rank=dist.get_rank()) for e in schedule.timeline_events]
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(events, gathered, dst=0)
        if gathered is not None:
            path = Path(self.trace_dir) / f"pipeline_step{step}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_chrome_trace([e for rank_events in gathered for e in rank_events], path,
                               name=f"{self.schedule_name} step {step}")

    def _finish_step(self) -> torch.Tensor:
        """Broadcast the batch loss and the logged values from the last stage; replay the logs everywhere."""
        payload = [None]
        if self.holds_last:
            runner = self.last_runner
            losses = [o["loss"] if isinstance(o, dict) else o for o in runner.step_outputs]
            loss = sum(float(v.detach()) * w for v, w in zip(losses, runner.weights, strict=True))
            payload = [(loss, runner.recorder.summary(self.lightning_module))]
        dist.broadcast_object_list(payload, src=self.last_rank, group=self.pp_group)
        loss, logged = payload[0]
        replay_logs(self.lightning_module, logged)
        return torch.tensor(loss, device=self.device)

    def stage_of_parameters(self) -> dict[int, int]:
        """id(parameter) -> the stage holding it (this rank holds two under interleaved / V schedules)."""
        return {id(p): m.stage_index for m in self.stage_modules for p in m.own_parameters()}

    def tied_copies(self) -> set[int]:
        """Ids of this rank's tied-weight copies that another stage's copy already stands for in a norm."""
        return {id(p) for _, params, counted in self.tied_groups if not counted for p in params}

    def _sum_tied_grads(self) -> None:
        for group, params, _ in self.tied_groups:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=group)

    # ------------------------------------------------------------------ evaluation
    def eval_step(self, hook: str, batch: Any, batch_idx: int, *args: Any) -> Any:
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
                            dist.send(t.contiguous(), dst=dst, group=self.pp_group)
                    continue

                def run_stage(*a: Any, _stage=stage, _received=received, **kw: Any) -> Any:
                    return _stage(*_received, model_args=a, model_kwargs=kw)

                with redirect_forward(self.pipelined, run_stage), \
                        self.last_runner.recorder.recording(self.lightning_module, 1.0):
                    result = step(batch, batch_idx, *args)
        payload = [(result, self.last_runner.recorder.summary(self.lightning_module)) if self.holds_last else None]
        dist.broadcast_object_list(payload, src=self.last_rank, group=self.pp_group)
        result, logged = payload[0]
        replay_logs(self.lightning_module, logged)
        return result

    def _recv(self, meta: torch.Tensor, pp_rank: int) -> torch.Tensor:
        buf = torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
        dist.recv(buf, src=dist.get_global_rank(self.pp_group, pp_rank), group=self.pp_group)
        return buf


def _example(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta").requires_grad_(t.is_floating_point())


def _identity_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The last stage's runner already returns the (scaled) loss of the user's step."""
    return output

