"""Unmodified LightningModules of the styles users write, over tiny random-init transformers configs.

Each ``training_step`` calls its model the way real code does: ``self.model(**batch).loss`` (HF style),
``logits = self(x)`` then a loss, or ``self(inputs, target)``. Nothing here knows about pipelines.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class DictData(Dataset):
    """Synthetic samples, deterministic per index (the same in every process)."""

    def __init__(self, kind: str, n: int = 32, seq: int = 8, vocab: int = 128, seed: int = 0,
                 variable_length: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.kind, self.n = kind, n
        if kind in ("causal", "seq2seq", "seqcls"):
            self.ids = torch.randint(0, vocab, (n, seq), generator=g)
            self.labels = torch.randint(0, 2, (n,), generator=g)
        elif kind in ("vit", "resnet"):
            size = 16 if kind == "vit" else 32
            self.pixels = torch.randn(n, 3, size, size, generator=g)
            self.labels = torch.randint(0, 3, (n,), generator=g)
        else:  # plain vectors
            self.x = torch.randn(n, 16, generator=g)
            self.y = torch.randn(n, 4, generator=g)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self.kind == "causal":
            return {"input_ids": self.ids[i], "labels": self.ids[i]}
        if self.kind == "seq2seq":
            return {"input_ids": self.ids[i], "labels": self.ids[i].flip(0)}
        if self.kind == "seqcls":
            return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}
        if self.kind in ("vit", "resnet"):
            return {"pixel_values": self.pixels[i], "labels": self.labels[i]}
        return self.x[i], self.y[i]


def variable_length_collate(batch: list[dict]) -> dict:
    """Pads each batch to a length that depends on the batch (different shapes from batch to batch)."""
    ids = torch.stack([b["input_ids"] for b in batch])
    length = 4 + int(ids[0, 0]) % 5
    return {"input_ids": ids[:, :length], "labels": ids[:, :length]}


def padded_labels_collate(batch: list[dict]) -> dict:
    """Each sample has its own length; labels are -100 past it, so HF's loss is a mean over a count of real tokens
    that varies from micro-batch to micro-batch (a loss that couples the batch)."""
    ids = torch.stack([b["input_ids"] for b in batch])
    lengths = 2 + ids[:, 0] % (ids.shape[1] - 2)
    labels = ids.masked_fill(torch.arange(ids.shape[1]) >= lengths[:, None], -100)
    return {"input_ids": ids, "labels": labels}


def collate_for(variable_length: bool | str):
    """``variable_length``: False (fixed shapes), True (batch-dependent length) or "padded" (padded labels)."""
    if variable_length == "padded":
        return padded_labels_collate
    return variable_length_collate if variable_length else None


def build_hf(name: str, dropout: float = 0.0) -> nn.Module:
    import transformers as tf

    common = dict(vocab_size=128)
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=4, n_embd=32, n_head=2, n_positions=32, resid_pdrop=dropout,
                                                embd_pdrop=dropout, attn_pdrop=dropout, tie_word_embeddings=False,
                                                **common))
    if name == "gpt2_tied":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=4, n_embd=32, n_head=2, n_positions=32, resid_pdrop=0.0,
                                                embd_pdrop=0.0, attn_pdrop=0.0, **common))
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                                                  num_attention_heads=4, num_key_value_heads=2,
                                                  max_position_embeddings=32, tie_word_embeddings=False,
                                                  attention_dropout=dropout, **common))
    if name == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=2,
                                                              intermediate_size=64, hidden_dropout_prob=0.0,
                                                              attention_probs_dropout_prob=0.0, num_labels=2, **common))
    if name == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=2,
                                                         intermediate_size=64, image_size=16, patch_size=8,
                                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                                         num_labels=3))
    if name == "resnet":
        return tf.ResNetForImageClassification(tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32],
                                                               depths=[1, 1, 1, 1], layer_type="basic", num_labels=3))
    if name == "bart":
        return tf.BartForConditionalGeneration(tf.BartConfig(encoder_layers=2, decoder_layers=2, d_model=32,
                                                             encoder_attention_heads=2, decoder_attention_heads=2,
                                                             encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0,
                                                             attention_dropout=0.0, activation_dropout=0.0,
                                                             max_position_embeddings=32, tie_word_embeddings=False,
                                                             **common))
    raise ValueError(name)


KIND = {"gpt2": "causal", "gpt2_tied": "causal", "llama": "causal", "bert": "seqcls", "vit": "vit",
        "resnet": "resnet", "bart": "seq2seq", "sequential": "plain", "custom_loss": "plain", "denoiser": "plain",
        "contrastive": "plain", "counting": "plain"}


class _Base(pl.LightningModule):
    """Data and optimizer shared by the test modules."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.get("momentum", 0.0))

    def _loader(self, seed: int, shuffle: bool) -> DataLoader:
        kind = KIND[self.hparams.name]
        collate = collate_for(self.hparams.variable_length)
        return DataLoader(DictData(kind, self.hparams.n, seed=seed), batch_size=self.hparams.batch_size,
                          shuffle=shuffle, collate_fn=collate)

    def train_dataloader(self):
        return self._loader(0, True)

    def val_dataloader(self):
        return self._loader(1, False)

    def predict_dataloader(self):
        return self._loader(2, False)


class HFModule(_Base):
    """HF style: ``loss = self.model(**batch).loss``. ``build="configure_model"``: the model is made in
    ``configure_model()`` (Lightning's large-model hook) instead of ``__init__``."""

    def __init__(self, name: str = "gpt2", lr: float = 0.1, batch_size: int = 8, n: int = 32,
                 variable_length: bool = False, dropout: float = 0.0, momentum: float = 0.0,
                 build: str = "eager", pretrained: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_hf(name, dropout) if build == "eager" else None
        self.step_losses: list[float] = []

    def configure_model(self):
        if self.model is None and self.hparams.pretrained:  # fine-tuning: a local transformers checkpoint folder
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(self.hparams.pretrained)
        elif self.model is None:
            self.model = build_hf(self.hparams.name, self.hparams.dropout)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        self.step_losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss, sync_dist=True)

    def predict_step(self, batch, batch_idx):
        return self.model(**batch).logits


class SequentialModule(_Base):
    """Plain PyTorch: nested ``nn.Sequential``; ``logits = self(x)`` then a loss in the step."""

    def __init__(self, name: str = "sequential", lr: float = 0.1, batch_size: int = 8, n: int = 32,
                 variable_length: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        block = lambda: nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Sequential(nn.Linear(32, 32), nn.Tanh()))  # noqa: E731
        self.net = nn.Sequential(nn.Linear(16, 32), *[block() for _ in range(4)], nn.Linear(32, 4))
        self.step_losses = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        self.step_losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


class CustomLossModule(SequentialModule):
    """``self(inputs, target)``: the LightningModule's forward returns the loss."""

    def forward(self, x, target=None):
        out = self.net(x)
        return out if target is None else nn.functional.mse_loss(out, target)

    def training_step(self, batch, batch_idx):
        loss = self(*batch)
        self.log("train_loss", loss)
        self.step_losses.append(float(loss.detach()))
        return loss


class DenoiserModule(SequentialModule):
    """Randomness in the step before the model call: the noise is the input's corruption and the target."""

    def __init__(self, name: str = "denoiser", lr: float = 0.05, batch_size: int = 8, n: int = 64,
                 variable_length: bool = False) -> None:
        super().__init__(name, lr, batch_size, n, variable_length)
        block = lambda: nn.Sequential(nn.Linear(32, 32), nn.Tanh())  # noqa: E731
        self.net = nn.Sequential(nn.Linear(16, 32), *[block() for _ in range(4)], nn.Linear(32, 16))
        self.noise_sums: list[float] = []

    def training_step(self, batch, batch_idx):
        x, _ = batch
        noise = torch.randn_like(x)
        self.noise_sums.append(float(noise.sum()))
        loss = nn.functional.mse_loss(self(x + noise), noise)
        self.step_losses.append(float(loss.detach()))
        return loss


class ContrastiveModule(SequentialModule):
    """In-batch negatives: every sample's embedding against every target's in the batch (a loss that couples the
    batch), with a projection head outside the pipelined ``net``."""

    def __init__(self, name: str = "contrastive", lr: float = 0.1, batch_size: int = 8, n: int = 32,
                 variable_length: bool = False) -> None:
        super().__init__(name, lr, batch_size, n, variable_length)
        self.proj = nn.Linear(4, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        za = nn.functional.normalize(self(x), dim=-1)
        zb = nn.functional.normalize(self.proj(y), dim=-1)
        logits = za @ zb.T / 0.1
        loss = nn.functional.cross_entropy(logits, torch.arange(len(x), device=x.device))
        self.log("train_loss", loss)
        self.step_losses.append(float(loss.detach()))
        return loss


class CountingModule(SequentialModule):
    """Effects around the model call: a counter and a print before it, a counter after it, a log."""

    def __init__(self, name: str = "counting", lr: float = 0.1, batch_size: int = 8, n: int = 32,
                 variable_length: bool = False) -> None:
        super().__init__(name, lr, batch_size, n, variable_length)
        self.calls = self.after = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.calls += 1
        print(f"STEP-PRINT {batch_idx}", flush=True)
        loss = nn.functional.mse_loss(self(x), y)
        self.after += 1
        self.log("train_loss", loss)
        self.step_losses.append(float(loss.detach()))
        return loss


def make_module(name: str, **kwargs) -> pl.LightningModule:
    pl.seed_everything(0, workers=False)
    if name == "denoiser":
        return DenoiserModule(name, **kwargs)
    if name == "contrastive":
        return ContrastiveModule(name, **kwargs)
    if name == "counting":
        return CountingModule(name, **kwargs)
    if name == "sequential":
        return SequentialModule(name, **kwargs)
    if name == "custom_loss":
        return CustomLossModule(name, **kwargs)
    return HFModule(name, **kwargs)
