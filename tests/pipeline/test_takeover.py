"""The training-step takeover pieces, on one process."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from torch import nn

from lightning_merak.pipeline.takeover import (
    LogRecorder,
    PipelineInputError,
    capture_model_call,
    redirect_forward,
    replay_logs,
    split_batch,
)


class Step(pl.LightningModule):
    def __init__(self, calls_model: bool = True) -> None:
        super().__init__()
        self.model = nn.Linear(3, 2)
        self.metric = torchmetrics.MeanSquaredError()
        self.calls_model = calls_model
        self.logged = []

    def log(self, name, value, **kwargs):  # record instead of touching a Trainer
        self.logged.append((name, value, kwargs))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("before", 1.0)
        out = self.model(x * 2) if self.calls_model else x
        return ((out - y) ** 2).mean()


def test_capture_returns_model_arguments_and_never_logs():
    module = Step()
    batch = (torch.ones(4, 3), torch.zeros(4, 2))
    args, kwargs = capture_model_call(module.training_step, module.model, module, batch, 0)
    torch.testing.assert_close(args[0], torch.full((4, 3), 2.0))
    assert kwargs == {} and module.logged == []


def test_step_that_never_calls_the_pipelined_module():
    module = Step(calls_model=False)
    with pytest.raises(PipelineInputError, match="never called the pipelined module"):
        capture_model_call(module.training_step, module.model, module, (torch.ones(4, 3), torch.zeros(4, 3)), 0)


def test_redirect_reaches_real_forward_when_nested():
    layer = nn.Linear(2, 2)
    seen = []

    def stage(x):
        seen.append("stage")
        return layer(x) + 1  # nested call: the real forward

    with redirect_forward(layer, stage):
        out = layer(torch.zeros(1, 2))
    torch.testing.assert_close(out, layer(torch.zeros(1, 2)) + 1)
    assert seen == ["stage"] and "forward" not in layer.__dict__


def test_split_batch_equal_parts_and_errors():
    batch = {"x": torch.arange(8).view(8, 1), "mask": torch.ones(1, 5), "n": 3}
    parts = split_batch(batch, 4)
    assert [p["x"].flatten().tolist() for p in parts] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all(p["mask"].shape == (1, 5) and p["n"] == 3 for p in parts)
    with pytest.raises(PipelineInputError, match="A batch of 2 samples cannot be split into 4 micro-batches"):
        split_batch({"x": torch.zeros(2, 1)}, 4)
    with pytest.raises(PipelineInputError, match="does not split evenly"):
        split_batch({"x": torch.zeros(6, 1)}, 4)


def test_log_recorder_weighted_mean_and_metric_replay():
    source, target = Step(), Step()
    recorder = LogRecorder()
    for weight, loss in ((0.25, 1.0), (0.75, 3.0)):
        with recorder.recording(source, weight):
            source.log("loss", torch.tensor(loss), prog_bar=True)
            source.metric(torch.tensor([loss]), torch.tensor([0.0]))
            source.log("mse", source.metric)
    logged = recorder.summary(source)
    value, kwargs = logged["loss"]
    assert float(value) == pytest.approx(0.25 * 1.0 + 0.75 * 3.0) and kwargs == {"prog_bar": True}
    replay_logs(target, logged)
    names = {name: value for name, value, _ in target.logged}
    assert names["mse"] is target.metric
    assert float(target.metric.compute()) == pytest.approx(float(source.metric.compute()))
