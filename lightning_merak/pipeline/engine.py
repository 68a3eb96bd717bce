"""The engines the strategy delegates every step to: ``PipelineEngine`` (pp > 1) and ``LocalEngine`` (pp = 1).

An engine is built from explicit arguments by ``parallelize.build_engine`` and never holds the strategy.
Each step returns a ``StepResult`` (what Lightning gets back, the logs to replay); ``end_step`` after the
optimizer step returns the memory figures to log. The strategy does the Lightning parts: data-parallel
gradient sync, logging, checkpoints.

Training under a pipeline uses torch's ``PipelineStage`` and a schedule (``runtime.build_schedule``) fed by
``StageRunner``; in evaluation every rank runs the user's ``validation_step``/``test_step``/``predict_step``
once, as under DDP, its model call answered by a forward-only pipeline of the whole batch (plain point-to-point
transfers) and the last stage's output broadcast over the pipeline group.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.distributed.pipelining import PipelineStage

from lightning_merak import failures
from lightning_merak._compat import local_shard, tree_flatten, tree_map
from lightning_merak.pipeline.microbatch import PipelineInputError
from lightning_merak.pipeline.plan.choose import ScheduleDecision
from lightning_merak.pipeline.takeover import (
    LossProbe,
    StageRunner,
    WholeBatchLoss,
    capture_model_call,
    loss_of,
    merge_dims,
    redirect_forward,
    split_batch,
)
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

    def tied_names(self) -> dict[str, str]:
        return {}  # one module: a tied weight is one parameter under its one-process name

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
                 trace_dir: str | None = None, batch_loss: str = "auto") -> None:
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
        # the step the simulator predicts from step AUTO_MEASURED_STEP's measured stage times (seconds); until
        # then the schedules record their timelines
        self.simulated_step: float | None = None
        # a loss over the whole batch (True), per micro-batch (False), or None: "auto" decides on the first step
        self.batch_loss = batch_loss
        self.whole_batch = {"whole": True, "microbatch": False}.get(batch_loss) if num_microbatches > 1 else False
        self._split_whole_capture: bool | None = None  # the whole batch's model call splits like its micro-batches
        inside = {id(p) for p in pipelined.parameters()}
        # parameters outside the pipelined module (a loss head): every rank holds them, the last stage's run of
        # the step computes their gradients
        self.outside = [p for p in lightning_module.parameters() if id(p) not in inside]
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

    def _schedule_for(self, signature: tuple, metas: list[tuple[tuple, tuple]], whole: bool) -> Any:
        signature = (*signature, whole)
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
                                  record_timeline=self.trace_dir is not None or self.simulated_step is None,
                                  whole_batch_loss=whole)
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
        if self.whole_batch is None:
            self._probe_batch_loss(step, batch, micro, batch_idx, args, ctx.rng_batch)
        whole = self.whole_batch
        inputs, whole_call = self._capture_inputs(step, batch, micro, batch_idx, args, ctx.rng_batch, whole)
        self._prepare_runners(ctx.rng_batch, inputs, [lambda mb=mb: step(mb, batch_idx, *args) for mb in micro])
        self.last_runner.loss_scale = ctx.loss_scale
        metas = [self._boundary(runner, inputs) for runner in self.runners]
        if self.holds_last and whole:
            dims = merge_dims(self._last_stage_metas(inputs, whole_call))
            self.last_runner.whole = WholeBatchLoss(lambda: step(batch, batch_idx, *args), self.num_microbatches,
                                                    dims)
        signature = tuple((tuple(t.shape), t.dtype) for recv, send in metas for t in (*recv, *send))
        schedule = self._schedule_for(signature, metas, whole)
        index = torch.arange(self.num_microbatches)
        if self.holds_last:
            schedule.step(mb=index, target=index, losses=[], return_outputs=False)
        else:
            schedule.step(mb=index)
        self._sum_tied_grads()
        self._share_outside_grads()
        self._last_schedule = schedule
        if self.trace_dir is not None:
            self._write_timeline(schedule, ctx.global_step)
        return self._finish_step()

    def _prepare_runners(self, rng_batch: int, inputs: list, steps: list) -> None:
        for runner in self.runners:
            runner.inputs, runner.weights = inputs, [1.0 / self.num_microbatches] * self.num_microbatches
            runner.rng, runner.batch_index = self.rng, rng_batch
        self.last_runner.steps, self.last_runner.step_outputs, self.last_runner.whole = steps, [], None

    def _last_stage_metas(self, inputs: list, whole_call: tuple) -> tuple[list[tuple], tuple]:
        """Shapes of what the last stage receives for each micro-batch and for the whole batch."""
        stage = self.last_runner.stage
        return [stage.boundary_metas(*c)[0] for c in inputs], stage.boundary_metas(*whole_call)[0]

    def _boundary(self, runner: StageRunner, inputs: list) -> tuple[tuple, tuple]:
        """The shapes of the stage's receive and send buffers for this step: per tensor the widest over the
        micro-batches. Where the micro-batches differ (graphs of different node counts), the runner pads what it
        sends to these shapes and cuts what it receives to its micro-batch's own (``StageRunner.shapes``)."""
        per = [runner.stage.boundary_metas(*c) for c in inputs]
        widest = tuple(_widest([p[k] for p in per], k, runner.stage.stage_index) for k in (0, 1))
        varies = any(tuple(t.shape) != tuple(w.shape) for p in per for k in (0, 1) for t, w in zip(p[k], widest[k],
                                                                                                   strict=True))
        runner.shapes = [tuple(tuple(tuple(t.shape) for t in p[k]) for k in (0, 1)) for p in per] if varies else None
        runner.widest_sends = [tuple(t.shape) for t in widest[1]]
        return widest

    def _capture_inputs(self, step: Any, batch: Any, micro: list[Any], batch_idx: int, args: tuple,
                        rng_batch: int, whole: bool, quiet: bool = False
                        ) -> tuple[list[tuple[tuple, dict]], tuple | None]:
        """The model call's (args, kwargs) per micro-batch, for the stages to rebuild what they do not receive;
        with a whole-batch loss also the whole batch's call, split into the micro-batches' where it splits like
        them, so that what the step draws before the model call is the one draw the last stage's run makes.

        Only the captures whose effects count are loud (``takeover.quiet_run``): on a rank with the last stage, its
        own run of the step is the one; ``quiet``: none of them count (the probe of ``batch_loss="auto"``)."""
        lm, m = self.lightning_module, self.num_microbatches
        def per_micro(loud: bool, first_only: bool = False) -> list[tuple[tuple, dict]]:
            calls = []
            for j, mb in enumerate(micro[:1] if first_only else micro):
                if self.rng is not None:  # the user's step before the model call draws as it does in the runner
                    self.rng.start(rng_batch, j, m)
                calls.append(capture_model_call(step, self.pipelined, lm, mb, batch_idx, *args, quiet=not loud))
            return calls

        if not whole:
            return per_micro(loud=not (self.holds_last or quiet)), None
        if self.rng is not None:
            self.rng.start_batch(rng_batch)
        whole_call = capture_model_call(step, self.pipelined, lm, batch, batch_idx, *args,
                                        quiet=self.holds_last or quiet)
        if self._split_whole_capture is None:
            self._split_whole_capture = _splits_like(whole_call, per_micro(loud=False, first_only=True)[0], m)
        if self._split_whole_capture:
            return split_batch(whole_call, m), whole_call
        return per_micro(loud=False), whole_call

    def _whole_batch_fits(self) -> bool:
        """Whether the last stage can hold every micro-batch's activations at once within the memory budget
        (modelled: its static bytes plus num_microbatches x one micro-batch's saved bytes)."""
        budget = getattr(self.auto, "budget", None)
        if budget is None:
            return True
        cost = self.auto.costs[-1]
        return cost.static_bytes + self.num_microbatches * cost.activation_bytes <= budget

    def _probe_batch_loss(self, step: Any, batch: Any, micro: list[Any], batch_idx: int, args: tuple,
                          rng_batch: int) -> None:
        """``batch_loss="auto"``, before the first step trains: a forward-only pass of every micro-batch (eval mode,
        no gradients, quiet runs of the step, generators left as they were), then on the last stage the loss of
        the whole batch against the mean of the micro-batch losses (``LossProbe``); settles ``whole_batch``."""
        lm = self.lightning_module
        modes = {mod: mod.training for mod in lm.modules()}
        devices = [self.device] if self.device.type == "cuda" else []
        lm.eval()
        try:
            with torch.random.fork_rng(devices=devices):
                inputs, whole_call = self._capture_inputs(step, batch, micro, batch_idx, args, rng_batch,
                                                          whole=True, quiet=True)
                received = [self._forward_stages(*call, run_last=False)[0] for call in inputs]
                verdict = failures.rank_local(
                    lambda: self._probe_verdict(step, batch, micro, batch_idx, args, rng_batch, inputs, whole_call,
                                                received),
                    "the last stage's test of whether the loss couples the batch", runs=self.holds_last,
                    src=self.last_rank, group=self.pp_group)
        finally:
            for mod, training in modes.items():
                mod.training = training
        self._settle_batch_loss(verdict)

    def _probe_verdict(self, step: Any, batch: Any, micro: list[Any], batch_idx: int, args: tuple, rng_batch: int,
                       inputs: list, whole_call: tuple, received: list) -> tuple:
        try:
            dims, unmergeable = merge_dims(self._last_stage_metas(inputs, whole_call)), None
        except PipelineInputError as err:
            dims, unmergeable = None, str(err)
        self._prepare_runners(rng_batch, inputs, [lambda mb=mb: step(mb, batch_idx, *args) for mb in micro])
        probe = LossProbe(lambda: step(batch, batch_idx, *args), self.num_microbatches, dims)
        probe.received = received
        probe.compare(self.last_runner)
        return probe.couples, probe.whole_loss, probe.micro_loss, unmergeable, probe.draws

    def end_step(self, global_step: int) -> dict[str, float]:
        """After the optimizer step: once, the simulation from measured times ("auto" re-chooses by it), and every
        stage's DELTA ledger as metrics."""
        if self.simulated_step is None and global_step >= AUTO_MEASURED_STEP and self._last_schedule is not None:
            self._measured(self._last_schedule, global_step)
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

    def _measured(self, schedule: Any, global_step: int) -> None:
        """Once, from this step's measured stage times (rank 0's pipeline decides for all replicas): "auto"'s
        re-choice, and the step the simulator predicts for the schedule that runs from now on (logged, and kept
        as ``simulated_step``); then the schedules are rebuilt, without timelines."""
        events: list[Any] = [None] * self.pp_size
        dist.all_gather_object(events, schedule.timeline_events, group=self.pp_group)
        every = [e for rank_events in events for e in rank_events]
        reselects = self.auto.reselects

        def decide() -> tuple[str, tuple[float, ...], str, float]:
            decision = self.auto.remeasured(every, global_step) if reselects else self.auto.decision
            return decision.name, decision.ratios, decision.reason, self.auto.simulated_seconds(every, decision)

        # on rank 0 alone while the others wait in the broadcast: an error there is raised on every rank
        name, ratios, reason, self.simulated_step = failures.rank_local(
            decide, "the simulation from measured times (and pipeline_schedule='auto''s re-choice)",
            runs=dist.get_rank() == 0)
        if reselects:
            rank_zero_info(f"Merak pipeline_schedule='auto', {reason}")
        rank_zero_info(f"Merak {name}: simulated step from the stage times measured in step {global_step}: "
                       f"{self.simulated_step:.4g} s (compute only; the optimizer step and Lightning's loop add to "
                       "the measured one)")
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
        def summary() -> tuple[float, dict]:
            runner = self.last_runner
            runner.whole = None
            loss = sum(float(loss_of(o).detach()) * w for o, w in runner.step_outputs)
            return loss, runner.recorder.summary(self.lightning_module)

        loss, logged = failures.rank_local(summary, "the last stage's loss and logs", runs=self.holds_last,
                                           src=self.last_rank, group=self.pp_group)
        return StepResult(torch.tensor(loss, device=self.device), logged)

    def _settle_batch_loss(self, verdict: tuple) -> None:
        """"auto"'s choice for every step: a whole-batch loss wherever any replica's loss coupled its first batch
        (one flag for the world, so every pipeline runs the same schedule)."""
        couples, whole_loss, micro_loss, unmergeable, draws = verdict
        flag = torch.tensor([float(couples)], device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        couples = bool(flag.item())
        fits = self._whole_batch_fits()
        measured = ("" if whole_loss is None else
                    f" (first step: whole-batch loss {whole_loss:.6g}, mean of the micro-batch losses {micro_loss:.6g})")
        if not couples and draws:
            self.whole_batch = False
            rank_zero_info("Merak batch_loss='auto': training_step draws random numbers itself, so the first step "
                           "cannot tell whether the loss couples the batch; one loss per micro-batch. If it does (in-"
                           "batch negatives, a mean over a varying count of tokens), set MerakStrategy(batch_loss="
                           "'whole').")
        elif not couples:
            self.whole_batch = False
            rank_zero_info(f"Merak batch_loss='auto': the loss does not couple the batch{measured}; one loss per "
                           "micro-batch.")
        elif unmergeable is not None or not fits:
            self.whole_batch = False
            why = unmergeable or (f"the last stage would hold all {self.num_microbatches} micro-batches' activations, "
                                  "over the memory budget")
            rank_zero_warn(f"Merak batch_loss='auto': the loss couples the batch{measured}, but it stays one loss per "
                           f"micro-batch, so results differ from one process: {why}. Set "
                           "MerakStrategy(batch_loss='whole') to compute it over the whole batch anyway, or "
                           "num_microbatches=1.")
        else:
            self.whole_batch = True
            rank_zero_info(f"Merak batch_loss='auto': the loss couples the batch{measured}, so the last stage computes "
                           f"it once over all {self.num_microbatches} micro-batches; the schedule runs every forward "
                           "before any backward.")

    def stage_of_parameters(self) -> dict[int, int] | None:
        """id(parameter) -> the stage holding it (this rank holds two under interleaved / V schedules)."""
        return {id(p): m.stage_index for m in self.stage_modules for p in m.own_parameters()}

    def tied_copies(self) -> set[int]:
        """Ids of this rank's tied-weight copies that another stage's copy already stands for in a norm."""
        return {id(p) for _, params, counted in self.tied_groups if not counted for p in params}

    def tied_names(self) -> dict[str, str]:
        """This rank's names of tied-weight copies (``lm_head.weight``) -> the name one process gives the weight,
        its first user's (``transformer.wte.weight``): checkpoints store the optimizer state under that one."""
        prefix = next(name for name, m in self.lightning_module.named_modules() if m is self.pipelined)
        local = {name for name, _ in self.lightning_module.named_parameters()}
        full = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
        return {full(alias): full(tie.names[0]) for tie in self.stage_modules[0].plan.tied
                for alias in tie.names[1:] if full(alias) in local and alias != tie.names[0]}

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

    def _share_outside_grads(self) -> None:
        """The last stage's gradients of the parameters outside the pipelined module, on every rank of the pipeline,
        so every copy takes the same optimizer step (one process's)."""
        if not self.outside:
            return
        has = torch.tensor([p.grad is not None for p in self.outside], dtype=torch.uint8, device=self.device)
        dist.broadcast(has, src=self.last_rank, group=self.pp_group)  # a parameter the loss did not use has none
        for p, used in zip(self.outside, has.tolist(), strict=True):
            if not used:
                p.grad = None
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.broadcast(local_shard(p.grad), src=self.last_rank, group=self.pp_group)

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
    def eval_step(self, hook: str, *args: Any, **kwargs: Any) -> StepResult:
        """The user's ``validation_step`` / ``test_step`` / ``predict_step`` runs once on every rank of the
        pipeline, as under DDP: its call of the pipelined module is answered by a forward-only pipeline of the
        whole batch and the model output the last stage computed, broadcast over the pipeline group. So what the
        step does around the call (appending to ``self``, updating a Metric, ``self.log``, returning predictions)
        happens alike on every rank; nothing is replayed. The generators are seeded per batch first, the same on
        every rank of a pipeline, so randomness drawn in the step is the same everywhere too."""
        if self.rng is not None:
            batch_idx = kwargs.get("batch_idx", args[1] if len(args) > 1 else 0)
            self.rng.start(int(batch_idx))
        with redirect_forward(self.pipelined, self._eval_model_call):
            return StepResult(getattr(self.lightning_module, hook)(*args, **kwargs))

    def _eval_model_call(self, *model_args: Any, **model_kwargs: Any) -> Any:
        """One call of the pipelined module inside an evaluation step, made by every rank of the pipeline alike:
        through the stages in order, then the last stage's output to every rank. Whatever the stages draw from
        the generators is undone, so the step continues with the same numbers on every rank."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._broadcast_output(self._forward_stages(model_args, model_kwargs)[1])

    def _forward_stages(self, model_args: tuple, model_kwargs: dict, run_last: bool = True) -> tuple[Any, Any]:
        """One call through this rank's stages in order, without gradients (receive, run, send). On the rank
        holding the last stage: what that stage received and (``run_last``) what it returned; else (None, None)."""
        received_last, output, outputs = None, None, ()
        with torch.no_grad():
            for stage in self.stage_modules:
                i = stage.stage_index
                received = outputs  # from this rank's previous stage, or received below
                if i > 0 and self.stage_to_rank[i - 1] != self.pp_rank:
                    recv_metas, _ = stage.boundary_metas(model_args, model_kwargs)
                    received = tuple(self._recv(meta, self.stage_to_rank[i - 1]) for meta in recv_metas)
                if i == self.num_stages - 1:
                    received_last = received
                    if run_last:
                        output = stage(*received, model_args=model_args, model_kwargs=model_kwargs)
                    continue
                outputs = stage(*received, model_args=model_args, model_kwargs=model_kwargs)
                if self.stage_to_rank[i + 1] != self.pp_rank:
                    dst = dist.get_global_rank(self.pp_group, self.stage_to_rank[i + 1])
                    for t in outputs:
                        dist.send(t, dst=dst, group=self.pp_group)  # stage outputs are contiguous
        return received_last, output

    def _broadcast_output(self, output: Any) -> Any:
        """The last stage's model output on every rank of the pipeline: its structure and non-tensor leaves as one
        object (tensors replaced by their shape and dtype), then each tensor by a broadcast on the device
        (activations and logits are not pickled)."""
        header: list[Any] = [None]
        if self.holds_last:
            header = [tree_map(lambda t: _TensorMeta(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t,
                               output)]
        dist.broadcast_object_list(header, src=self.last_rank, group=self.pp_group)
        if not self.holds_last:
            output = tree_map(lambda d: torch.empty(d.shape, dtype=d.dtype, device=self.device)
                              if isinstance(d, _TensorMeta) else d, header[0])
        for t in tree_flatten(output)[0]:
            if isinstance(t, torch.Tensor):
                buf = t if t.is_contiguous() else t.contiguous()
                dist.broadcast(buf.view(torch.uint8) if buf.dtype == torch.bool else buf, src=self.last_rank,
                               group=self.pp_group)
        return output

    def _recv(self, meta: torch.Tensor, pp_rank: int) -> torch.Tensor:
        buf = torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
        dist.recv(buf, src=dist.get_global_rank(self.pp_group, pp_rank), group=self.pp_group)
        return buf


@dataclass(frozen=True)
class _TensorMeta:
    """A tensor leaf of the model output, as announced before its broadcast."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _splits_like(call: tuple, first_micro: tuple, num_microbatches: int) -> bool:
    """Whether the whole batch's model call, split as a batch is, gives the first micro-batch's call its layout
    (a graph batch's node-index tensors do not split along their first dimension, for instance)."""
    try:
        piece = split_batch(call, num_microbatches)[0]
    except PipelineInputError:
        return False
    (a, a_spec), (b, b_spec) = tree_flatten(piece), tree_flatten(first_micro)
    if a_spec != b_spec:
        return False
    return all(type(x) is type(y) and (not isinstance(x, torch.Tensor) or x.shape == y.shape)
               for x, y in zip(a, b, strict=True))


def _widest(metas: list[tuple], kind: int, stage: int) -> tuple:
    """Per boundary tensor, the largest size of each dimension over the micro-batches (shape metas)."""
    widest = []
    for i, versions in enumerate(zip(*metas, strict=True)):
        if len({t.dim() for t in versions}) > 1 or len({t.dtype for t in versions}) > 1:
            raise PipelineInputError(
                f"Pipeline stage {stage} would {'receive' if kind == 0 else 'send'} tensor {i} with "
                f"{sorted({(t.dim(), str(t.dtype)) for t in versions})} (dimensions, dtype) in different micro-batches: "
                "the micro-batches of one step must agree on them. Set MerakStrategy(num_microbatches=1) to "
                "pipeline the whole batch at once.")
        shape = [max(sizes) for sizes in zip(*(t.shape for t in versions), strict=True)]
        widest.append(torch.empty(shape, dtype=versions[0].dtype, device="meta"))
    return tuple(widest)


def _example(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta").requires_grad_(t.is_floating_point())


def _identity_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The last stage's runner already returns the (scaled) loss of the user's step."""
    return output
