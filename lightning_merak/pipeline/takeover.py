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
  (``LogRecorder``), so callbacks, loggers and ``sync_dist`` behave as under DDP.
"""

from __future__ import annotations

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


def capture_model_call(step: Callable[..., Any], module: nn.Module, lightning_module: Any, *step_args: Any
                       ) -> tuple[tuple, dict]:
    """Run the user's ``step`` until it calls ``module``; return that call's (args, kwargs)."""

    def stop(*args: Any, **kwargs: Any) -> Any:
        raise _Captured(args, kwargs)

    try:
        with redirect_forward(module, stop), muted_logging(lightning_module), torch.no_grad():
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
        self.step_outputs: list[Any] = []
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

    def _check_boundary_shapes(self, index: int) -> None:
        """The next stage receives into buffers shaped by micro-batch 0: say so before sending another shape."""
        _, first = self.stage.boundary_metas(*self.inputs[0])
        _, this = self.stage.boundary_metas(*self.inputs[index])
        for a, b in zip(first, this, strict=True):
            if a.shape != b.shape:
                raise PipelineInputError(
                    f"Micro-batch {index} would send the next pipeline stage a tensor of shape {tuple(b.shape)}, "
                    f"micro-batch 0 one of shape {tuple(a.shape)}: the micro-batches of one step must send tensors "
                    "of one shape. Batches of graphs split by graph need equal node counts per micro-batch. Set "
                    "MerakStrategy(num_microbatches=1) to pipeline the whole batch at once, or train without a "
                    "pipeline (data parallelism and DELTA split nothing)."
                )

    def _forward(self, *received: torch.Tensor, mb: torch.Tensor) -> Any:
        index = int(mb.reshape(-1)[0])
        if self.rng is not None:
            self.rng.start(self.batch_index, index, len(self.weights))
        if not self.is_last:
            args, kwargs = self.inputs[index]
            if index:
                self._check_boundary_shapes(index)
            return self.stage(*received, model_args=args, model_kwargs=kwargs)

        def run_stage(*args: Any, **kwargs: Any) -> Any:
            return self.stage(*received, model_args=args, model_kwargs=kwargs)

        with redirect_forward(self._pipelined, run_stage), \
                self.recorder.recording(self._lightning_module, self.weights[index]):
            output = self.steps[index]()
        self.step_outputs.append(output)
        loss = output["loss"] if isinstance(output, dict) else output
        if not isinstance(loss, torch.Tensor):
            return torch.zeros(())  # forward-only use: the step's output is kept in step_outputs
        return loss * (self.weights[index] * self.loss_scale)
