"""Training-step takeover: the user's unmodified ``training_step`` drives a pipeline.

Lightning runs ``training_step`` then ``backward``. Under a pipeline the schedule runs forward *and* backward
of every micro-batch, so the strategy's ``training_step`` takes over (the design's "training-step takeover"):

- every rank splits the batch into micro-batches and runs the user's step with the pipelined module's
  ``forward`` redirected to *capture its arguments and stop* (``capture_model_call``): that gives the inputs
  each stage needs to recompute parameter-free values (masks, positions) itself;
- the last stage's per-micro-batch loss *is* the user's step, run with ``forward`` redirected to return the
  stage output (``StageRunner``), so whatever the step does after the model call (a loss, logging) happens
  exactly as written; the loss returned to Lightning is the micro-batch mean, identical on every rank;
- what the last stage logs is recorded, averaged over micro-batches and replayed on every rank of the pipeline
  (``LogRecorder``), so callbacks, loggers and ``sync_dist`` behave as under DDP;
- a loss that couples the samples of the batch (in-batch negatives, a mean over a varying count of real tokens)
  is computed once over the whole batch on the last stage (``WholeBatchLoss``): the stage runs over the
  concatenated inputs of every micro-batch and hands each micro-batch's received tensors their gradients.

The part of the step before the model call runs once per micro-batch (once per batch for a whole-batch loss) on
every rank: as the capture on ranks without the last stage, as the loss on the last stage. Extra runs, which only
capture (a rank holding the last stage also captures), are quiet: ``self.log`` is ignored, prints are silenced and
attributes set on the LightningModule are put back.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_merak._compat import load_metric_state, metric_state
from lightning_merak.intercept import wrap_forward
from lightning_merak.pipeline.microbatch import (  # noqa: F401 - callers import the splitting from here too
    PipelineInputError,
    batch_size_of,
    split_batch,
)


class _Captured(Exception):
    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("captured")
        self.args, self.kwargs = args, kwargs


@contextmanager
def redirect_forward(module: nn.Module, fn: Callable[..., Any]) -> Iterator[None]:
    """Route ``module(...)`` to ``fn`` for the outermost call only; nested calls (``fn`` itself running the
    module) reach the real forward (the ``intercept`` layer "takeover", outside DELTA and the stage dispatch)."""
    depth = [0]

    def wrapper(inner: Callable[..., Any]) -> Callable[..., Any]:
        def patched(*args: Any, **kwargs: Any) -> Any:
            if depth[0]:
                return inner(*args, **kwargs)
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        return patched

    wrap = wrap_forward(module, "takeover", wrapper)
    try:
        yield
    finally:
        wrap.remove()


@contextmanager
def muted_logging(lightning_module: Any) -> Iterator[None]:
    """Capture runs of the user's step must not log: only the last stage's real run does."""
    lightning_module.log = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del lightning_module.log


@contextmanager
def quiet_run(lightning_module: Any) -> Iterator[None]:
    """A run of the user's step that only captures or measures: prints silenced, and attributes the step sets on
    the LightningModule (a counter, a cached value) put back, so they change once per micro-batch as written."""
    before = {k: v for k, v in vars(lightning_module).items() if not k.startswith("_")}
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        state = vars(lightning_module)
        for key in [k for k in state if not k.startswith("_") and k not in before]:
            del state[key]
        state.update(before)


def capture_model_call(step: Callable[..., Any], module: nn.Module, lightning_module: Any, *step_args: Any,
                       quiet: bool = False) -> tuple[tuple, dict]:
    """Run the user's ``step`` until it calls ``module``; return that call's (args, kwargs). ``quiet``: this run is
    not the one whose effects count (``quiet_run``)."""

    def stop(*args: Any, **kwargs: Any) -> Any:
        raise _Captured(args, kwargs)

    try:
        with redirect_forward(module, stop), muted_logging(lightning_module), torch.no_grad(), \
                (quiet_run(lightning_module) if quiet else contextlib.nullcontext()):
            step(*step_args)
    except _Captured as captured:
        return captured.args, captured.kwargs
    raise PipelineInputError(
        f"`{type(lightning_module).__name__}.{getattr(step, '__name__', 'step')}` never called the pipelined module "
        f"({type(module).__name__}). The pipeline cuts that module into stages, so the step must call it (e.g. "
        "`self.model(**batch)` or `self(x)` whose forward calls it). Set MerakStrategy(pipeline_module=...) to "
        "the attribute path of the module your step uses."
    )


class LogRecorder:
    """Records ``self.log`` calls made during the last stage's micro-batches and replays their mean once."""

    def __init__(self) -> None:
        self.records: dict[str, list[tuple[float, Any, dict]]] = {}

    @contextmanager
    def recording(self, lightning_module: Any, weight: float) -> Iterator[None]:
        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if args:
                raise TypeError("MerakStrategy replays self.log calls; pass options to self.log by keyword.")
            self.records.setdefault(name, []).append((weight, value, kwargs))

        lightning_module.log = log
        try:
            yield
        finally:
            del lightning_module.log

    def summary(self, lightning_module: Any) -> dict[str, tuple[Any, dict]]:
        """Per name: the weighted mean of number values (equal to the full batch's value for means), or, for a
        torchmetrics Metric, its module path and state (its own state already covers all micro-batches)."""
        from torchmetrics import Metric

        paths: dict[int, str] = {}
        out: dict[str, tuple[Any, dict]] = {}
        for name, entries in self.records.items():
            kwargs = entries[-1][2]
            last = entries[-1][1]
            if isinstance(last, Metric):
                paths = paths or {id(m): n for n, m in lightning_module.named_modules()}
                state = metric_state(last)
                out[name] = (("metric", paths[id(last)], state), kwargs)
                continue
            total = sum(w for w, _, _ in entries)
            value = sum(w * float(v.detach() if isinstance(v, torch.Tensor) else v) for w, v, _ in entries) / total
            out[name] = (torch.tensor(value), kwargs)
        self.records.clear()
        return out


def replay_logs(lightning_module: Any, logged: dict[str, tuple[Any, dict]]) -> None:
    """Log what the last stage logged, on this rank; metrics get the last stage's state first."""
    for name, (value, kwargs) in logged.items():
        if isinstance(value, tuple) and value[0] == "metric":
            _, path, state = value
            metric = lightning_module.get_submodule(path)
            load_metric_state(metric, state)
            value = metric
        lightning_module.log(name, value, **kwargs)


class StageRunner(nn.Module):
    """What torch's ``PipelineStage`` runs on this rank for one micro-batch (selected by index ``mb``).

    Not registered in the LightningModule: it holds no state of its own, only references.
    """

    def __init__(self, stage: nn.Module, pipelined: nn.Module, lightning_module: Any, is_last: bool,
                 delta: Any = None) -> None:
        super().__init__()
        self.stage = stage
        self.delta = delta  # DELTA manages the saved tensors of each micro-batch's forward
        self.is_last = is_last
        object.__setattr__(self, "_pipelined", pipelined)  # not a submodule: no duplicate parameters
        object.__setattr__(self, "_lightning_module", lightning_module)
        self.inputs: list[tuple[tuple, dict]] = []  # per micro-batch (model_args, model_kwargs)
        self.steps: list[Callable[[], Any]] = []  # last stage: per micro-batch call of the user's step
        self.weights: list[float] = []
        self.loss_scale = 1.0
        self.recorder = LogRecorder()
        self.step_outputs: list[tuple[Any, float]] = []  # (what the user's step returned, its weight in the loss)
        self.whole: WholeBatchLoss | None = None  # this step computes the loss over the whole batch
        # per micro-batch (received shapes, sent shapes) where they differ within the step, else None
        self.shapes: list[tuple[tuple, tuple]] | None = None
        self.widest_sends: list[tuple[int, ...]] = []  # the next stage's receive buffers (set with ``shapes``)
        self.rng: Any = None  # the step's RNG streams (``rng.StepStreams`` or ``rng.MicrobatchRNG``), or None
        self.batch_index = 0
        self._params: list[nn.Parameter] | None = None

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The stage's own parameters, and on the last stage those of the user's step outside the pipelined module
        (a loss head): torch's split backward (ZB-V's W) computes their gradients from these."""
        if self._params is None:  # called per weight step: listed once, at the first step (after TP)
            self._params = list(self.stage.own_parameters())
            if self.is_last:
                inside = {id(p) for p in self._pipelined.parameters()}
                self._params += [p for p in self._lightning_module.parameters() if id(p) not in inside]
        return iter(self._params)

    def forward(self, *received: torch.Tensor, mb: torch.Tensor) -> Any:
        if self.delta is None or not torch.is_grad_enabled():
            return self._forward(*received, mb=mb)
        with self.delta.forward():
            return self._forward(*received, mb=mb)

    def _forward(self, *received: torch.Tensor, mb: torch.Tensor) -> Any:
        index = int(mb.reshape(-1)[0])
        if self.rng is not None:
            self.rng.start(self.batch_index, index, len(self.weights))
        if self.shapes is not None:  # buffers are the widest over the micro-batches: this one's own part
            received = tuple(_cut(t, shape) for t, shape in zip(received, self.shapes[index][0], strict=True))
        if not self.is_last:
            args, kwargs = self.inputs[index]
            sent = self.stage(*received, model_args=args, model_kwargs=kwargs)
            if self.shapes is not None:
                sent = tuple(_pad(t, shape) for t, shape in zip(sent, self.widest_sends, strict=True))
            return sent
        if self.whole is not None:
            return self.whole.forward(self, index, received)
        output = self.run_step(self.steps[index], received, self.weights[index])
        self.step_outputs.append((output, self.weights[index]))
        loss = loss_of(output)
        if not isinstance(loss, torch.Tensor):
            return torch.zeros(())  # forward-only use: the step's output is kept in step_outputs
        return loss * (self.weights[index] * self.loss_scale)

    def run_step(self, step: Callable[[], Any], received: tuple, weight: float | None) -> Any:
        """The user's step with the pipelined module's forward running this (last) stage on ``received``; what it
        logs is recorded with ``weight`` (None: a measuring run, whose logging is ignored)."""

        def run_stage(*args: Any, **kwargs: Any) -> Any:
            return self.stage(*received, model_args=args, model_kwargs=kwargs)

        lm = self._lightning_module
        with redirect_forward(self._pipelined, run_stage), \
                (muted_logging(lm) if weight is None else self.recorder.recording(lm, weight)):
            return step()


def loss_of(output: Any) -> Any:
    """The loss in what the user's step returned (a tensor, or a dict with "loss"), as Lightning reads it."""
    return output["loss"] if isinstance(output, dict) else output


class _DeferredGrad(torch.autograd.Function):
    """A micro-batch's stand-in loss on the last stage: zero in forward; its backward hands the tensors this
    micro-batch received the gradients the whole-batch loss gave them."""

    @staticmethod
    def forward(ctx: Any, whole: WholeBatchLoss, index: int, *received: torch.Tensor) -> torch.Tensor:
        ctx.whole, ctx.index = whole, index
        return received[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return (None, None, *(g * grad for g in ctx.whole.input_grads[ctx.index]))


def _cut(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """This micro-batch's part of a receive buffer sized for the widest one (a view: its gradient lands there)."""
    return t if tuple(t.shape) == tuple(shape) else t[tuple(slice(0, n) for n in shape)]


def _pad(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` at the start of zeros of ``shape``: what the widest receive buffer of the next stage expects."""
    if tuple(t.shape) == tuple(shape):
        return t
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def merge_dims(metas: tuple[list[tuple], tuple]) -> list[int | None]:
    """For each tensor the last stage receives: the dimension along which the micro-batches' copies concatenate
    into the whole batch's, from shape metas (per micro-batch, and of the batch); None for a tensor the batch
    does not size (a position bias: every micro-batch receives the same). ``PipelineInputError`` where neither
    holds."""
    per_micro, whole = metas
    dims: list[int | None] = []
    for i, b in enumerate(whole):
        parts = [m[i] for m in per_micro]
        if all(tuple(a.shape) == tuple(b.shape) for a in parts):
            dims.append(None)
            continue
        differ = {d for a in parts if a.dim() == b.dim()
                  for d, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y}
        dim = next(iter(differ)) if len(differ) == 1 else None
        if dim is None or any(a.dim() != b.dim() for a in parts) or \
                sum(a.shape[dim] for a in parts) != b.shape[dim]:
            raise PipelineInputError(
                f"The last pipeline stage receives tensor {i} of shapes {[tuple(a.shape) for a in parts]} per "
                f"micro-batch and {tuple(b.shape)} for the whole batch: it cannot be concatenated from the "
                "micro-batches, so the loss cannot be computed once over the whole batch. Set "
                "MerakStrategy(batch_loss='microbatch') (one loss per micro-batch, averaged) or num_microbatches=1."
            )
        dims.append(dim)
    return dims


def merge_received(received: list, dims: list[int | None]) -> tuple:
    """The whole batch's received tensors from the micro-batches' (``merge_dims``), detached: the leaves whose
    gradients are split back."""
    merged = []
    for i, dim in enumerate(dims):
        parts = [r[i] for r in received]
        t = parts[0] if dim is None else torch.cat(parts, dim=dim)
        merged.append(t.detach().requires_grad_(parts[0].requires_grad))
    return tuple(merged)


def _floats(received: tuple) -> list[torch.Tensor]:
    return [t for t in received if isinstance(t, torch.Tensor) and t.requires_grad]


class WholeBatchLoss:
    """The last stage's loss computed once over the whole batch, for a loss that couples its samples.

    The schedule runs every forward before any backward (``schedules.forwards_first``). Each micro-batch's forward
    on the last stage only keeps what it received and returns a stand-in loss (``_DeferredGrad``). After the last
    one, the stage runs over the received tensors concatenated (``merge_dims``), inside the user's step over the
    whole batch; that loss's backward fills the stage's and the loss head's gradients and gives the received
    tensors theirs, which the micro-batches' backwards hand back to the previous stage.
    """

    def __init__(self, step: Callable[[], Any], num_microbatches: int, dims: list[int | None]) -> None:
        self.step = step  # the user's step over the whole batch
        self.dims = dims
        self.received: list[tuple | None] = [None] * num_microbatches
        self.input_grads: list[tuple] = [()] * num_microbatches

    def forward(self, runner: StageRunner, index: int, received: tuple) -> torch.Tensor:
        self.received[index] = received
        floats = _floats(received)
        if not floats:
            raise PipelineInputError("The last pipeline stage receives no tensor that carries a gradient, so a "
                                     "whole-batch loss cannot reach the earlier stages; set "
                                     "MerakStrategy(batch_loss='microbatch').")
        stand_in = _DeferredGrad.apply(self, index, *floats)
        if all(r is not None for r in self.received):
            self._run(runner)
        return stand_in

    def _run(self, runner: StageRunner) -> None:
        merged = merge_received(self.received, self.dims)
        if runner.rng is not None:
            runner.rng.start_batch(runner.batch_index)
        output = runner.run_step(self.step, merged, 1.0)
        runner.step_outputs.append((output, 1.0))
        loss = loss_of(output)
        (loss * runner.loss_scale).backward()
        grads: list[list[torch.Tensor]] = [[] for _ in self.received]
        for i, (dim, t) in enumerate(zip(self.dims, merged, strict=True)):
            if not t.requires_grad:
                continue
            g = t.grad if t.grad is not None else torch.zeros_like(t)
            if dim is None:  # one tensor for every micro-batch: its whole gradient once
                pieces = [g] + [torch.zeros_like(g) for _ in self.received[1:]]
            else:
                pieces = list(g.split([r[i].shape[dim] for r in self.received], dim=dim))
            for j, piece in enumerate(pieces):
                grads[j].append(piece)
        self.input_grads = [tuple(g) for g in grads]
        self.received = [None] * len(self.received)


def _generator_states(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


class LossProbe:
    """The first step's test of whether the loss couples the batch (``batch_loss="auto"``), before that step
    trains: on the last stage, the loss of the whole batch against the weighted mean of the micro-batch losses,
    both in eval mode and without gradients (dropout would make them differ by chance), from the tensors a
    forward-only pass of every micro-batch delivered (``keep``)."""

    TOLERANCE = 1e-5  # relative: float rounding of one batched pass against several is ~1e-7

    def __init__(self, whole_step: Callable[[], Any], num_microbatches: int, dims: list[int | None] | None) -> None:
        """``dims``: ``merge_dims`` of the received tensors, None where they do not concatenate."""
        self.whole_step = whole_step
        self.dims = dims
        self.received: list[tuple | None] = [None] * num_microbatches
        self.whole_loss: float | None = None
        self.micro_loss: float | None = None
        self.draws = False  # the step itself draws random numbers: the losses differ by chance, no verdict

    @property
    def couples(self) -> bool:
        if self.whole_loss is None or self.micro_loss is None or self.draws:
            return False
        scale = max(abs(self.whole_loss), abs(self.micro_loss), 1e-12)
        return abs(self.whole_loss - self.micro_loss) > self.TOLERANCE * scale

    def compare(self, runner: StageRunner) -> None:
        if self.dims is None:  # the received tensors do not concatenate: nothing to compare
            return
        lm = runner._lightning_module
        modes = {m: m.training for m in lm.modules()}
        lm.eval()
        try:
            with torch.no_grad(), quiet_run(lm):
                if runner.rng is not None:
                    runner.rng.start_batch(runner.batch_index)
                merged = merge_received(self.received, self.dims)
                before = _generator_states(merged[0].device)
                self.whole_loss = float(loss_of(runner.run_step(self.whole_step, merged, None)))
                self.draws = any(not torch.equal(a, b) for a, b in zip(before, _generator_states(merged[0].device),
                                                                         strict=True))
                total = 0.0
                for j, (received, weight) in enumerate(zip(self.received, runner.weights, strict=True)):
                    if runner.rng is not None:
                        runner.rng.start(runner.batch_index, j, len(runner.weights))
                    total += weight * float(loss_of(runner.run_step(runner.steps[j], received, None)))
                self.micro_loss = total
        finally:
            for m, training in modes.items():
                m.training = training
            self.received = [None] * len(self.received)
