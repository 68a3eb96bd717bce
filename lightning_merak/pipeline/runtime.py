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

from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from lightning_merak._compat import (
    _ComputationType,
    _normalize_model_output_as_tuple,
    _PipelineContext,
    _PipelineScheduleRuntime,
    _ScheduleForwardOnly,
    _wait_batch_p2p,
)
from lightning_merak.pipeline.schedules import (
    MULTI_STAGE_SCHEDULES,
    SCHEDULE_NAMES,
    Schedule,
    ScheduleError,
    make_schedule,
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
    """Runs a ``Schedule`` (action lists) with Merak's pre-checkpoint / pre-recompute handlers.

    ``pre_checkpointed`` overrides the schedule's side table of (stage, micro-batch) pairs whose forward keeps
    only inputs; pass an empty set to run the same order with ordinary forwards.
    """

    def __init__(self, stages: Sequence[PipelineStage], schedule: Schedule, loss_fn: Callable | None = None, *,
                 pre_checkpointed: Collection[tuple[int, int]] | None = None, scale_grads: bool = False, **kwargs):
        super().__init__(list(stages), schedule.num_microbatches, loss_fn=loss_fn, scale_grads=scale_grads, **kwargs)
        if schedule.num_ranks != self.pp_group_size:
            raise ScheduleError(f"schedule {schedule.name!r} is for {schedule.num_ranks} pipeline ranks but the "
                                f"stage's group has {self.pp_group_size}.")
        self.schedule = schedule
        self.pre_checkpointed = frozenset(schedule.pre_checkpointed() if pre_checkpointed is None else pre_checkpointed)
        self._saved: dict[tuple[int, int], tuple[tuple, dict, Any]] = {}
        torch_actions = to_torch_actions(schedule)
        self.pipeline_order = {r: list(acts) for r, acts in enumerate(torch_actions)}
        self._prepare_schedule_with_comms(self.pipeline_order)
        if self.pre_checkpointed:
            self.register_custom_function(_ComputationType.FORWARD, self._forward)
            self.register_custom_function(_ComputationType.FULL_BACKWARD, self._backward)

    def _stage(self, index: int) -> PipelineStage:
        return next(s for s in self._stages if s.stage_index == index)

    def _forward(self, action, ctx: _PipelineContext) -> None:
        st, mb = action.stage_index, action.microbatch_index
        stage = self._stage(st)
        local = {s.stage_index for s in self._stages}
        self._assert_unsharded(stage)
        if not stage.is_first and st - 1 not in local:
            _wait_batch_p2p(self.fwd_recv_ops.pop((st, mb)))
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
        if st + 1 in local:
            self._stage(st + 1).set_local_fwd_input(output, mb)

    def _recompute(self, stage: PipelineStage, mb: int) -> None:
        """Re-run the stage forward with grad from the kept inputs; replace ``fwd_cache[mb]``."""
        args, kwargs, rng = self._saved.pop((stage.stage_index, mb))
        _, flat_inputs = stage.fwd_cache.pop(mb)
        if stage.is_first:
            inputs = args
        else:  # received buffers went through a no_grad forward: requires_grad is off, re-enable it on a leaf
            received = flat_inputs[: len(stage.args_recv_info[mb])]   # fwd_cache keeps args, then kwargs
            inputs = tuple(t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t
                           for t in received)
        current = _rng_state(stage.device)
        _set_rng_state(rng, stage.device)
        try:
            with torch.enable_grad():
                output = stage.submod(*inputs, **kwargs)
        finally:
            _set_rng_state(current, stage.device)
        flat = list(inputs) if not stage.is_first else list(flat_inputs)
        stage.fwd_cache[mb] = (_normalize_model_output_as_tuple(output), flat)

    def _backward(self, action, ctx: _PipelineContext) -> None:
        st, mb = action.stage_index, action.microbatch_index
        stage = self._stage(st)
        local = {s.stage_index for s in self._stages}
        self._assert_unsharded(stage)
        if (st, mb) in self.pre_checkpointed:
            self._recompute(stage, mb)   # the gradient receive is already posted: this overlaps it
        if not stage.is_last and st + 1 not in local:
            _wait_batch_p2p(self.bwd_recv_ops.pop((st, mb)))
        loss = self._maybe_get_loss(stage, mb)
        self.backward_counter[st] += 1
        last_backward = self.backward_counter[st] == self._n_microbatches
        stage.backward_one_chunk(mb, loss=loss, full_backward=True, last_backward=last_backward)
        if st - 1 in local:
            self._stage(st - 1).set_local_bwd_input(stage.get_local_bwd_output(mb), mb)


def build_schedule(name: str, stage: PipelineStage | Sequence[PipelineStage], n_microbatches: int,
                   loss_fn: Callable | None, *, recompute_table: Collection[tuple[int, int]] | None = None,
                   scale_grads: bool = False):
    """The torch schedule object that runs ``name`` over this rank's stage(s).

    ``stage``: one ``PipelineStage`` (gpipe, 1f1b, shifted_critical_path) or a list of two (interleaved_1f1b,
    zbv). ``recompute_table``: (stage, micro-batch) pairs to pre-checkpoint under shifted_critical_path
    (default: Merak's, from the schedule). Micro-batch rules are checked by the action-list builders, so a bad
    count fails here with the rule in the message.
    """
    if name not in SCHEDULE_NAMES:
        raise ScheduleError(f"unknown pipeline schedule {name!r}; choose one of {list(SCHEDULE_NAMES)}.")
    stages = list(stage) if isinstance(stage, (list, tuple)) else [stage]
    want = 2 if name in MULTI_STAGE_SCHEDULES else 1
    if len(stages) != want:
        raise ScheduleError(f"pipeline_schedule={name!r} runs {want} stage(s) per rank; got {len(stages)}.")
    group_size = stages[0].group_size
    plan = make_schedule(name, group_size, n_microbatches)   # validates the micro-batch rules
    if name == "gpipe":
        return ScheduleGPipe(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    if name == "1f1b":
        return Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    if name == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    if name == "zbv":
        return ScheduleZBVZeroBubble(stages, n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    return ActionListSchedule(stages, plan, loss_fn, pre_checkpointed=recompute_table, scale_grads=scale_grads)


def forward_only_schedule(stage: PipelineStage, n_microbatches: int):
    """Forward-only pipeline for validate/test/predict: every micro-batch forwarded in order, no loss."""
    return _ScheduleForwardOnly(stage, n_microbatches)
