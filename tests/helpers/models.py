"""Small LightningModules and data shared by the tests and the scripts they launch."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class RegressionData(Dataset):
    """Deterministic synthetic regression data: y = tanh(x @ w) + noise, the same in every process."""

    def __init__(self, n: int = 64, dim: int = 16, seed: int = 123) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        w = torch.randn(dim, 1, generator=g)
        self.y = torch.tanh(self.x @ w) + 0.05 * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class RegressionModule(pl.LightningModule):
    """An MLP whose ``training_step`` calls ``self(x)`` then computes the loss: the plain Lightning style."""

    def __init__(self, dim: int = 16, hidden: int = 32, depth: int = 4, lr: float = 0.05, batch_size: int = 4,
                 optimizer: str = "adam", n: int = 64, sync_dist: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Linear(dim, hidden), nn.Tanh()]
        for _ in range(depth - 2):
            layers += [nn.Linear(hidden, hidden), nn.Tanh()]
        layers.append(nn.Linear(hidden, 1))
        self.net = nn.Sequential(*layers)
        self.val_mse = torchmetrics.MeanSquaredError()
        self.step_losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True, sync_dist=self.hparams.sync_dist)
        self.step_losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        loss = nn.functional.mse_loss(pred, y)
        self.val_mse(pred, y)
        self.log("val_loss", loss, sync_dist=True)
        self.log("val_mse", self.val_mse)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def predict_step(self, batch, batch_idx):
        x, _ = batch
        return self(x)

    def configure_optimizers(self):
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def _loader(self, seed: int, shuffle: bool) -> DataLoader:
        return DataLoader(RegressionData(self.hparams.n, self.hparams.dim, seed), batch_size=self.hparams.batch_size,
                          shuffle=shuffle)

    def train_dataloader(self):
        return self._loader(123, True)

    def val_dataloader(self):
        return self._loader(7, False)

    def test_dataloader(self):
        return self._loader(8, False)

    def predict_dataloader(self):
        return self._loader(9, False)


class RegressionDataModule(pl.LightningDataModule):
    def __init__(self, batch_size: int = 4, n: int = 64, dim: int = 16) -> None:
        super().__init__()
        self.batch_size, self.n, self.dim = batch_size, n, dim

    def train_dataloader(self):
        return DataLoader(RegressionData(self.n, self.dim, 123), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(RegressionData(self.n, self.dim, 7), batch_size=self.batch_size)


def reference_loader(dataset: Dataset, global_batch: int, shuffle: bool = True) -> DataLoader:
    """What the data-parallel ranks draw together, for a one-process reference (see DESIGN.md, Testing)."""
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=0)
    return DataLoader(dataset, batch_size=global_batch, sampler=sampler)


class RecordLoss(pl.Callback):
    """The loss Lightning receives from each training step, as the test scripts report it."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
