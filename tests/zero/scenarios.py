"""ZeRO scenarios on a small MLP, run under MerakStrategy on 2 processes (``tests/scripts/zero_fit.py``) or as
the one-process reference (in the pytest process, reading per step what both replicas read together).

The optimizers are the kinds ZeRO must carry unchanged: AdamW with two param groups (decay / no decay, their
own learning rates) under a StepLR schedule, and SGD with momentum.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from tests.helpers.models import RegressionData, reference_loader

BATCH = 4  # per data-parallel rank
WORLD = 2
N = 64


class ZeroModule(pl.LightningModule):
    """Layers of different sizes (so ownership by bytes has something to balance) and a LayerNorm."""

    def __init__(self, optimizer: str = "adamw", reference: bool = False, batch_size: int = BATCH) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.LayerNorm(64), nn.Linear(64, 32), nn.Tanh(),
                                 nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 1))
        self.step_losses: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.step_losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        decay = [p for n, p in self.named_parameters() if n.endswith("weight") and p.dim() > 1]
        no_decay = [p for n, p in self.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                 {"params": no_decay, "weight_decay": 0.0, "lr": 0.02}], lr=0.01)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.5),
                                                   "interval": "step"}}

    def train_dataloader(self):
        data = RegressionData(N, 16, 123)
        if self.hparams.reference:
            return reference_loader(data, self.hparams.batch_size * WORLD)
        return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=True)


class MeasureMemory(Callback):
    """Per step: gradient bytes after the data-parallel sync (just before the optimizer step) and optimizer-state
    bytes after it, with the replica's totals for the bound (what one replica holds without ZeRO)."""

    def __init__(self) -> None:
        self.grad_bytes: list[int] = []
        self.state_bytes: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        from lightning_merak.zero import gradient_bytes

        self.grad_bytes.append(gradient_bytes(list(pl_module.parameters())))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from lightning_merak.zero import optimizer_state_bytes

        self.state_bytes.append(optimizer_state_bytes(trainer.optimizers[0]))


def fit(reference: bool, root: Path, zero_stage: int, optimizer: str, ckpt_dir: Path | None = None,
        ckpt_path: str | None = None, devices: int = WORLD, batch_size: int = BATCH, strategy_kwargs: dict | None = None,
        **trainer_kwargs) -> dict:
    pl.seed_everything(0, workers=False)
    model = ZeroModule(optimizer, reference=reference, batch_size=batch_size)
    memory = MeasureMemory()
    callbacks: list[Callback] = [memory]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), save_top_k=-1, filename="{epoch}"))
    if reference:
        strategy, devices = "auto", 1
    else:
        from lightning_merak import MerakStrategy

        strategy = MerakStrategy(zero_stage=zero_stage, timeout=datetime.timedelta(seconds=300), **(strategy_kwargs or {}))
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                         enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=not reference,
                         default_root_dir=str(root), num_sanity_val_steps=0, max_epochs=2, callbacks=callbacks,
                         **trainer_kwargs)
    trainer.fit(model, ckpt_path=ckpt_path)
    from lightning_merak.zero import parameter_state_bytes

    state = trainer.optimizers[0].state.values()
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "losses": model.step_losses,
            "grad_bytes": memory.grad_bytes, "state_bytes": memory.state_bytes,
            "largest_param_bytes": max(p.numel() * p.element_size() for p in model.parameters()),
            "largest_state_bytes": max(map(parameter_state_bytes, state), default=0),
            "lr": [g["lr"] for g in trainer.optimizers[0].param_groups]}


SCENARIOS = {
    # AdamW, two param groups, StepLR; the first epoch's checkpoint is resumed at dp=1 by the test
    "adamw": lambda ref, root, stage, **kw: fit(ref, root, stage, "adamw", ckpt_dir=None if ref else root / "ckpts",
                                                **kw),
    "sgd_accumulate_clip": lambda ref, root, stage, **kw: fit(ref, root, stage, "sgd", accumulate_grad_batches=2,
                                                              gradient_clip_val=0.05, **kw),
    "bf16": lambda ref, root, stage, **kw: fit(ref, root, stage, "sgd", precision="bf16-mixed", **kw),
    # DELTA manages the saved activations under a budget below the unmanaged peak; gradients stay bitwise equal
    "delta": lambda ref, root, stage, **kw: fit(ref, root, stage, "adamw", strategy_kwargs=None if ref else {
        "memory_manager": "delta", "memory_budget": "38KiB"}, **kw),
}
