"""Pre-train a small GPT-2 (random init, synthetic data) with LightningCLI.

This script never imports lightning_merak: ``--trainer.strategy=merak`` resolves through the package's
import hook, exactly as in a user's existing training script. Examples:

    python examples/gpt2_pretrain.py fit --config examples/gpt2_3d.yaml       # dp=2 x pp=2 x tp=2 on 8 CPU processes
    python examples/gpt2_pretrain.py fit --trainer.strategy=merak --trainer.devices=2 --trainer.accelerator=cpu
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, Dataset
from transformers import GPT2Config, GPT2LMHeadModel


class SyntheticText(Dataset):
    """Token sequences from a fixed random bigram table: learnable structure, no download."""

    def __init__(self, n_samples: int, seq_len: int, vocab_size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        table = torch.randint(0, vocab_size, (vocab_size, 4), generator=g)
        start = torch.randint(0, vocab_size, (n_samples,), generator=g)
        choice = torch.randint(0, 4, (n_samples, seq_len), generator=g)
        tokens = torch.empty(n_samples, seq_len, dtype=torch.long)
        tokens[:, 0] = start
        for t in range(1, seq_len):
            tokens[:, t] = table[tokens[:, t - 1], choice[:, t]]
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


class TextDataModule(pl.LightningDataModule):
    def __init__(self, batch_size: int = 8, seq_len: int = 64, vocab_size: int = 512, n_samples: int = 512) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        return DataLoader(SyntheticText(h.n_samples, h.seq_len, h.vocab_size), batch_size=h.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        h = self.hparams
        return DataLoader(SyntheticText(h.n_samples // 8, h.seq_len, h.vocab_size, seed=1), batch_size=h.batch_size)


class GPT2Pretrain(pl.LightningModule):
    """An ordinary HF-style LightningModule: nothing in it knows about parallelism."""

    def __init__(self, n_layer: int = 8, n_embd: int = 128, n_head: int = 4, vocab_size: int = 512,
                 seq_len: int = 64, lr: float = 3e-3, dropout: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size, n_positions=seq_len,
                            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, tie_word_embeddings=False)
        self.model = GPT2LMHeadModel(config)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch).loss, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class Throughput(pl.Callback):
    """Prints tokens/s of the global batch (all data-parallel replicas), skipping warm-up steps."""

    def __init__(self, warmup_steps: int = 2) -> None:
        self.warmup_steps = warmup_steps
        self.tokens = 0
        self.start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup_steps and self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.tokens += batch["input_ids"].numel() * trainer.strategy.distributed_sampler_kwargs["num_replicas"]

    def on_train_end(self, trainer, pl_module) -> None:
        if self.start is not None and trainer.is_global_zero:
            elapsed = time.perf_counter() - self.start
            print(f"throughput: {self.tokens / elapsed:,.0f} tokens/s over {trainer.global_step - self.warmup_steps} "
                  f"steps ({elapsed:.1f} s)", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    LightningCLI(GPT2Pretrain, TextDataModule, trainer_defaults={"callbacks": [Throughput()]}, seed_everything_default=0,
                 save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
