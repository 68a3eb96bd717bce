"""Lightning conformance scenarios, run either under MerakStrategy on several processes (from
``tests/scripts/conformance.py``) or as the one-process reference (in the pytest process).

Each scenario returns a dict of plain tensors/numbers: the test compares the two. The reference draws the
same samples per step as the data-parallel ranks do together (``reference_loader``).
"""

from __future__ import annotations

import copy
import datetime
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from tests.helpers.models import RegressionData, RegressionDataModule, RegressionModule, reference_loader

BATCH = 4  # per data-parallel rank
WORLD = 2


class ReferenceModule(RegressionModule):
    """The same module, loading what all replicas load together in one batch."""

    def train_dataloader(self):
        return reference_loader(RegressionData(self.hparams.n, self.hparams.dim, 123), BATCH * WORLD)

    def val_dataloader(self):
        return reference_loader(RegressionData(self.hparams.n, self.hparams.dim, 7), BATCH * WORLD, shuffle=False)

    def test_dataloader(self):
        return reference_loader(RegressionData(self.hparams.n, self.hparams.dim, 8), BATCH * WORLD, shuffle=False)

    def predict_dataloader(self):
        return reference_loader(RegressionData(self.hparams.n, self.hparams.dim, 9), BATCH * WORLD, shuffle=False)


class RecordValidation(Callback):
    def __init__(self) -> None:
        self.val_losses: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_losses.append(float(trainer.callback_metrics["val_loss"]))


def _module(reference: bool, **kwargs) -> RegressionModule:
    pl.seed_everything(0, workers=False)
    cls = ReferenceModule if reference else RegressionModule
    return cls(batch_size=BATCH, **kwargs)


def _trainer(reference: bool, strategy_kwargs: dict, root: Path, **kwargs) -> pl.Trainer:
    if reference:
        strategy, devices = "auto", 1
    else:
        from lightning_merak import MerakStrategy

        strategy = MerakStrategy(timeout=datetime.timedelta(seconds=60), **strategy_kwargs)
        devices = WORLD
    defaults = dict(accelerator="cpu", devices=devices, strategy=strategy, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=not reference,
                    default_root_dir=str(root), num_sanity_val_steps=0)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def fit(reference: bool, root: Path, strategy_kwargs: dict, precision: str = "32-true", optimizer: str = "adam",
        **trainer_kwargs) -> dict:
    model = _module(reference, optimizer=optimizer)
    rec = RecordValidation()
    trainer = _trainer(reference, strategy_kwargs, root, max_epochs=2, precision=precision, callbacks=[rec],
                       limit_val_batches=2, **trainer_kwargs)
    trainer.fit(model)
    return {"params": _params(model), "losses": model.step_losses, "val_losses": rec.val_losses,
            "global_step": trainer.global_step, "val_mse": float(trainer.callback_metrics["val_mse"])}


def eval_all(reference: bool, root: Path, strategy_kwargs: dict) -> dict:
    model = _module(reference)
    trainer = _trainer(reference, strategy_kwargs, root)
    val = trainer.validate(model, verbose=False)[0]
    test = trainer.test(model, verbose=False)[0]
    preds = torch.cat(trainer.predict(model))
    return {"val_loss": val["val_loss"], "val_mse": val["val_mse"], "test_loss": test["test_loss"], "preds": preds}


def checkpoint_resume(reference: bool, root: Path, strategy_kwargs: dict) -> dict:
    """Uninterrupted 4 epochs vs 2 epochs + resume from the best/last checkpoint to 4 epochs."""
    full = _module(reference)
    _trainer(reference, strategy_kwargs, root / "full", max_epochs=4, limit_val_batches=2).fit(full)
    part = _module(reference)
    ckpt_cb = ModelCheckpoint(dirpath=str(root / "ckpts"), monitor="val_loss", save_last=True, save_top_k=1)
    _trainer(reference, strategy_kwargs, root / "part", max_epochs=2, limit_val_batches=2, callbacks=[ckpt_cb],
             enable_checkpointing=True).fit(part)
    resumed = _module(reference)
    trainer = _trainer(reference, strategy_kwargs, root / "resumed", max_epochs=4, limit_val_batches=2)
    trainer.fit(resumed, ckpt_path=str(root / "ckpts" / "last.ckpt"))
    return {"full_losses": full.step_losses, "resumed_losses": resumed.step_losses, "params": _params(resumed),
            "full_params": _params(full), "best_model_path": ckpt_cb.best_model_path,
            "best_model_score": float(ckpt_cb.best_model_score), "part_losses": part.step_losses}


def early_stopping(reference: bool, root: Path, strategy_kwargs: dict) -> dict:
    model = _module(reference, lr=0.5, optimizer="sgd")
    stop = EarlyStopping(monitor="val_loss", patience=0, min_delta=10.0, mode="min")
    trainer = _trainer(reference, strategy_kwargs, root, max_epochs=10, callbacks=[stop], limit_val_batches=2)
    trainer.fit(model)
    return {"stopped_epoch": stop.stopped_epoch, "current_epoch": trainer.current_epoch,
            "global_step": trainer.global_step, "params": _params(model)}


def max_steps_val_interval(reference: bool, root: Path, strategy_kwargs: dict) -> dict:
    model = _module(reference)
    rec = RecordValidation()
    trainer = _trainer(reference, strategy_kwargs, root, max_steps=10, val_check_interval=3, callbacks=[rec],
                       limit_val_batches=2)
    trainer.fit(model)
    return {"global_step": trainer.global_step, "val_losses": rec.val_losses, "params": _params(model)}


def datamodule(reference: bool, root: Path, strategy_kwargs: dict) -> dict:
    model = _module(reference)
    dm = RegressionDataModule(batch_size=BATCH)
    if reference:  # the reference reads the replicas' union of samples per step
        dm.train_dataloader = lambda: reference_loader(RegressionData(64, 16, 123), BATCH * WORLD)
        dm.val_dataloader = lambda: reference_loader(RegressionData(64, 16, 7), BATCH * WORLD, shuffle=False)
    trainer = _trainer(reference, strategy_kwargs, root, max_epochs=1)
    trainer.fit(model, datamodule=dm)
    return {"params": _params(model), "losses": model.step_losses}


SCENARIOS = {
    "fit": lambda ref, root, sk: fit(ref, root, sk),
    "accumulate": lambda ref, root, sk: fit(ref, root, sk, accumulate_grad_batches=2),
    "clip": lambda ref, root, sk: fit(ref, root, sk, gradient_clip_val=0.05),
    # SGD: Adam's normalised steps turn bf16 rounding noise in near-zero gradients into lr-sized differences
    "bf16": lambda ref, root, sk: fit(ref, root, sk, precision="bf16-mixed", optimizer="sgd"),
    "eval": eval_all,
    "checkpoint": checkpoint_resume,
    "early_stopping": early_stopping,
    "max_steps": max_steps_val_interval,
    "datamodule": datamodule,
}


def run(names: list[str], reference: bool, root: Path, strategy_kwargs: dict | None = None) -> dict[str, dict]:
    return {name: SCENARIOS[name](reference, root / name, copy.deepcopy(strategy_kwargs or {})) for name in names}
