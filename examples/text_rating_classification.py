"""Text rating classification: a small BERT classifier (transformers config, random weights) predicts a review's
rating (negative / neutral / positive), tensor-parallel over 2 processes, with torchmetrics macro F1.

A LightningCLI script on synthetic reviews made here (no download): positive or negative words, or none, among
neutral filler. The module is ordinary HF-style code (``self.model(**batch)``); the strategy comes from the
config file, which shards every attention and MLP layer over 2 processes (``tensor_parallel_size: 2``: the plan
is printed).

    python examples/text_rating_classification.py fit --config examples/text_rating_tp2.yaml
    python examples/text_rating_classification.py fit --trainer.devices=1 --trainer.accelerator=cpu
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassF1Score
from transformers import BertConfig, BertForSequenceClassification

VOCAB = 256
POSITIVE = range(10, 14)
NEGATIVE = range(14, 18)


class SyntheticReviews(Dataset):
    """Token reviews: 3-6 negative words (rating 0), none (rating 1) or 3-6 positive words (rating 2) among
    filler, anywhere after [CLS]."""

    def __init__(self, n: int, length: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(50, VOCAB, (n, length), generator=g)
        self.ids[:, 0] = 1  # [CLS]
        self.labels = torch.randint(0, 3, (n,), generator=g)
        for i, label in enumerate(self.labels.tolist()):
            if label == 1:
                continue
            words = NEGATIVE if label == 0 else POSITIVE
            count = int(torch.randint(3, 7, (), generator=g))
            slots = torch.randperm(length - 1, generator=g)[:count] + 1
            self.ids[i, slots] = torch.tensor(words)[torch.randint(0, len(words), (count,), generator=g)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


class ReviewData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 32, length: int = 16, n_train: int = 512) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        return DataLoader(SyntheticReviews(h.n_train, h.length, seed=0), batch_size=h.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(SyntheticReviews(256, self.hparams.length, seed=1), batch_size=self.hparams.batch_size)


class RatingClassifier(pl.LightningModule):
    def __init__(self, hidden: int = 64, layers: int = 2, heads: int = 4, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=4 * hidden, max_position_embeddings=64, num_labels=3,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.model = BertForSequenceClassification(config)
        self.val_f1 = MulticlassF1Score(num_classes=3, average="macro")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.model(**batch)
        self.val_f1(out.logits.argmax(-1), batch["labels"])
        self.log("val_f1", self.val_f1, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class Report(pl.Callback):
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            print(f"text rating: val F1 {float(trainer.callback_metrics['val_f1']):.3f} after {trainer.global_step} "
                  f"steps", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    LightningCLI(RatingClassifier, ReviewData, trainer_defaults={"callbacks": [Report()]}, seed_everything_default=0,
                 save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
