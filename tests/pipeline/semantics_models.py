"""LightningModules whose steps do more than call a model (issue 12): side effects in evaluation steps, and a
two-tower model that no single child dominates. Nothing here knows about pipelines."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


def _tower(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, outputs))


def regression_data(n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 16, generator=g), torch.randn(n, 4, generator=g))


class EvalSideEffects(pl.LightningModule):
    """Appends per-sample errors in ``validation_step`` / ``test_step``, updates torchmetrics Metrics, logs with
    ``on_epoch=True``, reduces the lists in ``on_*_epoch_end``; a head outside the pipelined ``net`` runs after the
    model call."""

    def __init__(self, n: int = 32, batch_size: int = 4, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = _tower(16, 8)
        self.head = nn.Linear(8, 4)
        self.val_mse = torchmetrics.MeanSquaredError()
        self.test_mae = torchmetrics.MeanAbsoluteError()
        self.val_errors: list[torch.Tensor] = []
        self.test_errors: list[torch.Tensor] = []
        self.reduced: dict[str, list[dict]] = {"val": [], "test": []}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def _eval(self, batch, errors: list, metric: torchmetrics.Metric, stage: str) -> torch.Tensor:
        x, y = batch
        out = self(x)
        err = (out - y).pow(2).mean(1)
        errors.append(err)
        metric.update(out, y)
        self.log(f"{stage}_loss", err.mean(), on_step=False, on_epoch=True)
        self.log(f"{stage}_metric", metric, on_step=False, on_epoch=True)
        return out

    def validation_step(self, batch, batch_idx):
        self._eval(batch, self.val_errors, self.val_mse, "val")

    def test_step(self, batch, batch_idx):
        self._eval(batch, self.test_errors, self.test_mae, "test")

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def _reduce(self, errors: list, stage: str) -> None:
        every = torch.cat(errors)  # empty on a stage that never saw the step's end: a crash
        self.reduced[stage].append({"mean": float(every.mean()), "max": float(every.max()), "count": len(every)})
        self.log(f"{stage}_reduced", every.mean())
        errors.clear()

    def on_validation_epoch_end(self):
        self._reduce(self.val_errors, "val")

    def on_test_epoch_end(self):
        self._reduce(self.test_errors, "test")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def _loader(self, seed: int) -> DataLoader:
        return DataLoader(regression_data(self.hparams.n, seed), batch_size=self.hparams.batch_size)

    def train_dataloader(self):
        return self._loader(0)

    def val_dataloader(self):
        return self._loader(1)

    def test_dataloader(self):
        return self._loader(2)

    def predict_dataloader(self):
        return self._loader(3)


class PairData(Dataset):
    """(structure features, text features, target similarity in [-1, 1]) per sample."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.s, self.t = torch.randn(n, 16, generator=g), torch.randn(n, 12, generator=g)
        self.y = torch.rand(n, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.s[i], self.t[i], self.y[i]


class TwoTower(pl.LightningModule):
    """A structure tower and a text tower of about half the parameters each, and a small projection; the step calls
    ``self(structure, text)``. The loss is per sample (cosine similarity of the pair against its target), so it
    does not couple the samples of a batch."""

    def __init__(self, n: int = 32, batch_size: int = 8, lr: float = 0.2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.structure = _tower(16, 16)
        self.text = _tower(12, 16)
        self.proj = nn.Linear(16, 16)

    def forward(self, structure: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.structure(structure), self.proj(self.text(text))

    def training_step(self, batch, batch_idx):
        s, t, y = batch
        a, b = self(s, t)
        loss = (nn.functional.cosine_similarity(a, b) - y).pow(2).mean()
        self.log("train_loss", loss)
        return loss

    def predict_step(self, batch, batch_idx):
        s, t, _ = batch
        return nn.functional.cosine_similarity(*self(s, t))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        return DataLoader(PairData(self.hparams.n), batch_size=self.hparams.batch_size, shuffle=True)

    def predict_dataloader(self):
        return DataLoader(PairData(self.hparams.n, seed=1), batch_size=self.hparams.batch_size)


MODULES = {"eval_side_effects": EvalSideEffects, "two_tower": TwoTower}


def make(name: str, **kwargs) -> pl.LightningModule:
    pl.seed_everything(0, workers=False)
    return MODULES[name](**kwargs)
