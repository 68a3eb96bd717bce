"""Structure–text contrastive retrieval: a graph tower (GIN over molecules, torch_geometric) and a text tower
(a small transformer over descriptions) trained CLIP-style with in-batch negatives, pipelined over 2 processes.

A plain LightningModule on synthetic molecules made here (no download), each with a token "description" of its
atoms and bonds. MerakStrategy pipelines the larger tower (the text transformer, cut into 2 stages: the partition
table is printed); the structure tower and the loss run with the last stage. The batch is a ``torch_geometric``
``Batch`` (graphs + their descriptions): with ``num_microbatches=1`` it goes through the pipeline whole, so every
sample's negatives are the whole batch, as in one process. (With more micro-batches, batches of graphs split by graph, but a loss over in-batch negatives
would then see only each micro-batch's negatives: not the one-process result yet.) Validation reports
recall@5 of text -> structure retrieval with torchmetrics. Needs ``pip install lightning-merak[graph]``.

    python examples/structure_text_retrieval.py              # pp=2 on 2 CPU processes
    python examples/structure_text_retrieval.py --pp 1 --devices 1
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader
from torch_geometric.nn import GINConv, global_add_pool
from torchmetrics.retrieval import RetrievalRecall

ATOM_TYPES = 6
VOCAB = ATOM_TYPES * 8 + 16
TEXT_LEN = 12


def molecule(seed: int) -> Data:
    """Atoms of 6 types in a chain with extra bonds; the description counts atoms per type and bonds, in a
    random order with filler tokens."""
    g = torch.Generator().manual_seed(seed)
    atoms = int(torch.randint(5, 13, (), generator=g))
    kind = torch.randint(0, ATOM_TYPES, (atoms,), generator=g)
    chain = torch.stack([torch.arange(atoms - 1), torch.arange(1, atoms)])
    extra = torch.randint(0, atoms, (2, int(torch.randint(0, 4, (), generator=g))), generator=g)
    bonds = torch.cat([chain, extra], 1)
    counts = torch.bincount(kind, minlength=ATOM_TYPES).clamp(max=7)
    words = [t * 8 + int(c) for t, c in enumerate(counts) if c > 0] + [ATOM_TYPES * 8 + bonds.shape[1]]
    filler = torch.randint(ATOM_TYPES * 8 + 12, VOCAB, (TEXT_LEN - len(words),), generator=g).tolist()
    text = torch.tensor(words + filler)[torch.randperm(TEXT_LEN, generator=g)]
    return Data(x=F.one_hot(kind, ATOM_TYPES).float(), edge_index=torch.cat([bonds, bonds.flip(0)], 1),
                input_ids=text.view(1, -1))


class GraphTower(nn.Module):
    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Linear(ATOM_TYPES, dim)
        self.convs = nn.ModuleList(GINConv(nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)))
                                   for _ in range(layers))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for conv in self.convs:
            h = h + conv(h, edge_index).relu()
        return self.proj(global_add_pool(h, batch))


class TextTower(nn.Module):
    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0,
                                                                        batch_first=True), layers)
        self.proj = nn.Linear(dim, dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.encoder(self.embed(input_ids)).mean(1))  # no positions: a bag of words


class StructureTextRetrieval(pl.LightningModule):
    def __init__(self, samples: int = 256, batch_size: int = 32, dim: int = 64, temperature: float = 0.1,
                 lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.structure = GraphTower(dim, layers=3)
        self.text = TextTower(dim, layers=4)
        self.recall = RetrievalRecall(top_k=5)

    def similarities(self, batch) -> torch.Tensor:
        structure = F.normalize(self.structure(batch.x, batch.edge_index, batch.batch), dim=-1)
        text = F.normalize(self.text(batch.input_ids), dim=-1)
        return text @ structure.T / self.hparams.temperature  # row i: text i against every structure

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        logits = self.similarities(batch)
        target = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2  # in-batch negatives
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        scores = self.similarities(batch)
        n = len(scores)
        queries = (batch_idx * n + torch.arange(n, device=scores.device)).repeat_interleave(n)
        self.recall(scores.flatten(), torch.eye(n, dtype=torch.bool, device=scores.device).flatten(), indexes=queries)
        self.log("val_recall@5", self.recall, prog_bar=True)

    def train_dataloader(self) -> DataLoader:
        return DataLoader([molecule(i) for i in range(self.hparams.samples)], batch_size=self.hparams.batch_size,
                          shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([molecule(10_000 + i) for i in range(128)], batch_size=self.hparams.batch_size)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    from lightning_merak import MerakStrategy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0)
    # one micro-batch: the whole batch's negatives reach the loss (any schedule runs one micro-batch alike)
    strategy = MerakStrategy(pipeline_parallel_size=args.pp, num_microbatches=1, pipeline_schedule="gpipe")
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_epochs=args.epochs,
                         logger=False, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(StructureTextRetrieval())
    if trainer.is_global_zero:
        print(f"structure-text retrieval: val recall@5 {float(trainer.callback_metrics['val_recall@5']):.3f} "
              f"after {trainer.global_step} steps (pp={args.pp})", flush=True)


if __name__ == "__main__":
    main()
