"""Executes our action-list schedules on torch's pipeline runtime.

``gpipe``/``1f1b`` (and the two-stage-per-rank ``interleaved_1f1b``/``zbv``) use torch's own classes. Merak's
``shifted_critical_path`` runs on ``ActionListSchedule``, a ``_PipelineScheduleRuntime`` fed the per-rank
lists from ``schedules.py``; torch's lowering adds the sends/receives (receives are posted before the
compute that waits on them). Two custom handlers implement Merak's instructions:

- F, pre-checkpointed (``PreCheckpointForwardPass``): the stage forward runs under ``no_grad``; only its
  inputs and the RNG state are kept.
- B, pre-checkpointed (``RecomputeRecvGrad``): the forward is re-run with grad from the kept inputs (detached,
  ``requires_grad_``, RNG restored so dropout masks match) *before* waiting on the gradient receive, which is
  already in flight; then the ordinary backward.

Both handlers replace torch's built-in ones, so they repeat its bookkeeping: receive waits, FSDP unshard
asserts, loss on the last stage, ``backward_counter``/``last_backward`` for the gradient sync.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
import torch.distributed.pipelining as torch_pipelining
from torch.distributed.pipelining import PipelineStage

from lightning_merak._compat import (
    _ComputationType,
    _normalize_model_output_as_tuple,
    _PipelineContext,
    _PipelineScheduleRuntime,
    _ScheduleForwardOnly,
    _wait_batch_p2p,
)
from lightning_merak.pipeline.plan.schedules import (
    Action,
    Schedule,
    ScheduleError,
    forwards_first,
    spec,
    to_torch_actions,
)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class ActionListSchedule(_PipelineScheduleRuntime):
    """Runs any ``Schedule`` (action lists) with our F/B/I/W handlers, which add Merak's instructions.

    ``pre_checkpointed`` overrides the schedule's side table of (stage, micro-batch) pairs whose forward keeps
    only inputs; pass an empty set to run the same order with ordinary forwards. With ``record_timeline`` each
    compute action's wall-clock interval (from the end of its receive wait) is appended to ``timeline_events``
    as ``{"rank", "action", "start", "end"}`` (seconds since the step began), ready for
    ``timeline.to_chrome_trace`` and ``simulate.measured_costs``.
    """

    def __init__(self, stages: Sequence[PipelineStage], schedule: Schedule, loss_fn: Callable | None = None, *,
                 pre_checkpointed: Collection[tuple[int, int]] | None = None, scale_grads: bool = False,
                 record_timeline: bool = False, **kwargs):
        super().__init__(list(stages), schedule.num_microbatches, loss_fn=loss_fn, scale_grads=scale_grads, **kwargs)
        if schedule.num_ranks != self.pp_group_size:
            raise ScheduleError(f"schedule {schedule.name!r} is for {schedule.num_ranks} pipeline ranks but the "
                                f"stage's group has {self.pp_group_size}.")
        self.schedule = schedule
        self.pre_checkpointed = frozenset(schedule.pre_checkpointed() if pre_checkpointed is None else pre_checkpointed)
        self.record_timeline = record_timeline
        self.timeline_events: list[dict] = []
        self._t0 = 0.0
        self._compute_start: float | None = None  # set after a handler's receive wait: waiting is not compute
        self._saved: dict[tuple[int, int], tuple[tuple, dict, Any]] = {}
        self.pipeline_order = {r: list(acts) for r, acts in enumerate(to_torch_actions(schedule))}
        self._prepare_schedule_with_comms(self.pipeline_order)
        self.register_custom_function(_ComputationType.FORWARD, self._timed(self._forward))
        self.register_custom_function(_ComputationType.FULL_BACKWARD, self._timed(self._backward))
        self.register_custom_function(_ComputationType.BACKWARD_INPUT, self._timed(self._backward))
        self.register_custom_function(_ComputationType.BACKWARD_WEIGHT, self._timed(self._weight_backward))

    def _step_microbatches(self, *args, **kwargs):
        self._t0 = time.perf_counter()
        self.timeline_events.clear()
        return super()._step_microbatches(*args, **kwargs)

    def _record(self, label: str, start: float) -> None:
        if self.record_timeline:
            self.timeline_events.append({"rank": self.rank, "action": label, "start": start - self._t0,
                                         "end": time.perf_counter() - self._t0})

    def _timed(self, handler: Callable) -> Callable:
        def run(action, ctx: _PipelineContext) -> None:
            self._compute_start = None
            start = time.perf_counter()
            handler(action, ctx)
            start = self._compute_start or start
            pre = (action.stage_index, action.microbatch_index) in self.pre_checkpointed
            self._record(str(Action.from_torch(action, pre)), start)
        return run

    def _stage(self, index: int) -> PipelineStage:
        return next(s for s in self._stages if s.stage_index == index)

    def _local(self) -> set[int]:
        return {s.stage_index for s in self._stages}

    def _forward(self, action, ctx: _PipelineContext) -> None:
        st, mb = action.stage_index, action.microbatch_index
        stage = self._stage(st)
        self._assert_unsharded(stage)
        if not stage.is_first and st - 1 not in self._local():
            _wait_batch_p2p(self.fwd_recv_ops.pop((st, mb)))
            self._compute_start = time.perf_counter()
        args, kwargs = ctx.arg_mbs[mb], ctx.kwarg_mbs[mb]
        if (st, mb) in self.pre_checkpointed:
            if stage.is_last:
                raise ScheduleError(f"{action}: the last stage cannot pre-checkpoint (its loss needs the graph).")
            rng = _rng_state(stage.device)
            with torch.no_grad():
                output = stage.forward_one_chunk(mb, args, kwargs)
            self._saved[(st, mb)] = (args, kwargs, rng)
        else:
            output = stage.forward_one_chunk(mb, args, kwargs)
        self._maybe_compute_loss(stage, output, ctx.target_mbs, mb)
        if st + 1 in self._local():   # V placement: the next stage is on this rank, no send/recv
            self._stage(st + 1).set_local_fwd_input(output, mb)

    def _recompute(self, stage: PipelineStage, mb: int) -> None:
        """Re-run the stage forward with grad from the kept inputs; replace ``fwd_cache[mb]``."""
        start = time.perf_counter()
        args, kwargs, rng = self._saved.pop((stage.stage_index, mb))
        _, flat_inputs = stage.fwd_cache.pop(mb)
        if stage.is_first:
            inputs, flat = args, list(flat_inputs)
        else:  # the receive buffers went through a no_grad forward: requires_grad is off, re-enable on leaves
            received = flat_inputs[: len(stage.args_recv_info[mb])]   # fwd_cache keeps args, then kwargs
            inputs = tuple(t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t
                           for t in received)
            flat = list(inputs)
        current = _rng_state(stage.device)
        _set_rng_state(rng, stage.device)   # same dropout masks as the pre-checkpointed forward
        try:
            with torch.enable_grad():
                output = stage.submod(*inputs, **kwargs)
        finally:
            _set_rng_state(current, stage.device)
        stage.fwd_cache[mb] = (_normalize_model_output_as_tuple(output), flat)
        self._record(str(Action(stage.stage_index, "R", mb)), start)

    def _backward(self, action, ctx: _PipelineContext) -> None:
        """B (full) or I (input-gradient only); recomputes first when pre-checkpointed (``RecomputeRecvGrad``)."""
        st, mb = action.stage_index, action.microbatch_index
        full = action.computation_type == _ComputationType.FULL_BACKWARD
        stage = self._stage(st)
        self._assert_unsharded(stage)
        if (st, mb) in self.pre_checkpointed:
            self._recompute(stage, mb)   # the gradient receive is already posted: this overlaps it
        if not stage.is_last and st + 1 not in self._local():
            _wait_batch_p2p(self.bwd_recv_ops.pop((st, mb)))
            self._compute_start = time.perf_counter()   # (a recompute before the wait is recorded as R)
        loss = self._maybe_get_loss(stage, mb)
        last_backward = False
        if full:
            self.backward_counter[st] += 1
            last_backward = self.backward_counter[st] == self._n_microbatches
        stage.backward_one_chunk(mb, loss=loss, full_backward=full, last_backward=last_backward)
        if st - 1 in self._local():
            self._stage(st - 1).set_local_bwd_input(stage.get_local_bwd_output(mb), mb)

    def _weight_backward(self, action, ctx: _PipelineContext) -> None:
        st, mb = action.stage_index, action.microbatch_index
        stage = self._stage(st)
        self._assert_unsharded(stage)
        self.backward_counter[st] += 1
        stage.backward_weight_one_chunk(mb, last_backward=self.backward_counter[st] == self._n_microbatches)


def build_schedule(name: str, stage: PipelineStage | Sequence[PipelineStage], n_microbatches: int,
                   loss_fn: Callable | None, *, recompute_table: Collection[tuple[int, int]] | None = None,
                   scale_grads: bool = False, record_timeline: bool = False, whole_batch_loss: bool = False):
    """The torch schedule object that runs ``name`` over this rank's stage(s).

    ``stage``: one ``PipelineStage`` (gpipe, 1f1b, shifted_critical_path) or a list of two (interleaved_1f1b,
    zbv). ``recompute_table``: (stage, micro-batch) pairs to pre-checkpoint under shifted_critical_path
    (default: Merak's, from the schedule). ``record_timeline``: run on ``ActionListSchedule`` whatever the
    name, so that ``.timeline_events`` holds this rank's real (action, start, end) records after each step.
    ``whole_batch_loss``: every forward before any backward (``forwards_first``), so the last stage can compute a
    loss that couples the batch once over all micro-batches.
    Micro-batch rules are checked by the action-list builders, so a bad count fails here with the rule.
    """
    entry = spec(name)
    stages = list(stage) if isinstance(stage, (list, tuple)) else [stage]
    if len(stages) != entry.stages_per_rank:
        raise ScheduleError(f"pipeline_schedule={name!r} runs {entry.stages_per_rank} stage(s) per rank; got "
                            f"{len(stages)}.")
    plan = entry.build(stages[0].group_size, n_microbatches)   # validates the micro-batch rules
    if whole_batch_loss:
        plan = forwards_first(plan)
    if record_timeline or recompute_table or whole_batch_loss or entry.torch_class is None:
        return ActionListSchedule(stages, plan, loss_fn, pre_checkpointed=recompute_table, scale_grads=scale_grads,
                                  record_timeline=record_timeline)
    torch_class = getattr(torch_pipelining, entry.torch_class)
    return torch_class(stages if entry.stages_per_rank > 1 else stages[0], n_microbatches, loss_fn=loss_fn,
                       scale_grads=scale_grads)


def forward_only_schedule(stage: PipelineStage, n_microbatches: int):
    """Forward-only pipeline for validate/test/predict: every micro-batch forwarded in order, no loss."""
    return _ScheduleForwardOnly(stage, n_microbatches)
