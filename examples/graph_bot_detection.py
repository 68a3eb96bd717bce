"""Bot detection on a multi-relational social graph: an RGCN (torch_geometric) classifies every account.

A plain LightningModule, trained on synthetic communities made here (no download): accounts follow, retweet
and mention each other; bots post in bursts (their features) and retweet each other far more than people do.
Each step is one whole community graph (full-graph training, a ``torch_geometric.loader.DataLoader`` of
``Data``); data parallelism gives each process other communities, and DELTA keeps the saved activations of
the message passing within ``--memory-budget`` by swapping and recomputing them (bitwise the same training).
Nothing is split into micro-batches: no pipeline is needed for this. Needs ``pip install lightning-merak[graph]``.

    python examples/graph_bot_detection.py                                  # dp=2 x DELTA on 2 CPU processes
    python examples/graph_bot_detection.py --devices 1 --memory-budget none # one process, unmanaged
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader
from torch_geometric.nn import RGCNConv
from torchmetrics.classification import BinaryF1Score

RELATIONS = ("follows", "retweets", "mentions")
FEATURES = 12


def community(accounts: int, seed: int) -> Data:
    """One community: 20 % bots; every account makes 8 interactions, bots retweeting bots most of the time."""
    g = torch.Generator().manual_seed(seed)
    bot = torch.rand(accounts, generator=g) < 0.2
    x = torch.randn(accounts, FEATURES, generator=g)
    x[bot, :3] += 1.2  # posting bursts, young accounts, few followers: a weak signal alone
    src = torch.arange(accounts).repeat_interleave(8)
    relation = torch.randint(0, len(RELATIONS), (src.numel(),), generator=g)
    dst = torch.randint(0, accounts, (src.numel(),), generator=g)
    bots = bot.nonzero().flatten()
    from_bot = bot[src] & (relation == 1) & (torch.rand(src.numel(), generator=g) < 0.9)
    dst[from_bot] = bots[torch.randint(0, bots.numel(), (int(from_bot.sum()),), generator=g)]
    train = torch.rand(accounts, generator=g) < 0.7
    return Data(x=x, edge_index=torch.stack([src, dst]), edge_type=relation, y=bot.long(), train_mask=train,
                val_mask=~train)


class RGCN(nn.Module):
    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, hidden)
        self.convs = nn.ModuleList(RGCNConv(hidden, hidden, len(RELATIONS)) for _ in range(layers))
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_type: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).relu()
        for conv in self.convs:
            h = h + conv(h, edge_index, edge_type).relu()
        return self.head(h)


class BotDetector(pl.LightningModule):
    def __init__(self, communities: int = 8, accounts: int = 600, hidden: int = 64, layers: int = 3,
                 lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = RGCN(hidden, layers)
        self.val_f1 = BinaryF1Score()

    def training_step(self, graph: Data, batch_idx: int) -> torch.Tensor:
        logits = self.model(graph.x, graph.edge_index, graph.edge_type)
        loss = F.cross_entropy(logits[graph.train_mask], graph.y[graph.train_mask])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, graph: Data, batch_idx: int) -> None:
        logits = self.model(graph.x, graph.edge_index, graph.edge_type)
        self.val_f1(logits[graph.val_mask].argmax(-1), graph.y[graph.val_mask])
        self.log("val_f1", self.val_f1, prog_bar=True)

    def train_dataloader(self) -> DataLoader:
        graphs = [community(self.hparams.accounts, seed=c) for c in range(self.hparams.communities)]
        return DataLoader(graphs, batch_size=1, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([community(self.hparams.accounts, seed=c) for c in range(self.hparams.communities)],
                          batch_size=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    from lightning_merak import MerakStrategy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--memory-budget", default="1.5MiB", help="per process, or 'none' for no DELTA")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0)
    delta = {} if args.memory_budget == "none" else {"memory_manager": "delta", "memory_budget": args.memory_budget}
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy=MerakStrategy(**delta),
                         max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False, num_sanity_val_steps=0)
    module = BotDetector()
    trainer.fit(module)
    if trainer.is_global_zero:
        print(f"bot detection: val F1 {float(trainer.callback_metrics['val_f1']):.3f} after {trainer.global_step} "
              f"steps on {args.devices} process(es)", flush=True)


if __name__ == "__main__":
    main()
