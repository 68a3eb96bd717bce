"""Fine-tune a transformers checkpoint folder, pipelined, with every rank reading only its own tensors.

The LightningModule loads the model in ``configure_model()`` with ``AutoModelForCausalLM.from_pretrained(folder)``,
as one would for any large model. Under ``MerakStrategy`` that builds the model on the meta device; after the cut
each rank reads only its stage's tensors from the safetensors shards. Nothing can be downloaded here, so the
script first writes a small random GPT-2 checkpoint folder (sharded, with an index) to fine-tune.

Run: ``python examples/finetune_pretrained.py [--folder /tmp/merak_gpt2] [--pp 2] [--steps 30]``
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_merak import MerakStrategy


def write_checkpoint(folder: Path) -> None:
    """A 'pretrained' GPT-2 with random weights, saved as transformers saves any model: sharded safetensors."""
    import transformers as tf

    if (folder / "model.safetensors.index.json").exists():
        return
    config = tf.GPT2Config(n_layer=4, n_embd=128, n_head=4, n_positions=64, vocab_size=512)
    tf.GPT2LMHeadModel(config).save_pretrained(folder, max_shard_size="500KB")


class FineTune(pl.LightningModule):
    def __init__(self, folder: str, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = None

    def configure_model(self) -> None:
        if self.model is None:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(self.hparams.folder)

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        # a learnable task: each sequence counts up from a random start, modulo the vocabulary
        g = torch.Generator().manual_seed(0)
        starts = torch.randint(0, 512, (256, 1), generator=g)
        return DataLoader((starts + torch.arange(32)) % 512, batch_size=8, shuffle=True)


class FirstAndLast(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "merak_pretrained_gpt2"))
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    folder = Path(args.folder)
    write_checkpoint(folder)  # before fit: Lightning starts the other ranks there, and they find it written
    torch.set_num_threads(1)
    pl.seed_everything(0)
    losses = FirstAndLast()
    trainer = pl.Trainer(accelerator="cpu", devices=args.pp, max_steps=args.steps, logger=False,
                         strategy=MerakStrategy(pipeline_parallel_size=args.pp), callbacks=[losses],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(FineTune(str(folder)))
    if trainer.is_global_zero:
        first, last = sum(losses.losses[:3]) / 3, sum(losses.losses[-3:]) / 3
        print(f"fine-tuning {folder}: loss {first:.3f} -> {last:.3f} over {len(losses.losses)} steps")


if __name__ == "__main__":
    main()
