"""Unmodified torch_geometric LightningModules: an RGCN trained on one full graph (node classification) and a
GIN-style molecule-property regressor over mini-batches of graphs. Nothing here knows about pipelines."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader
from torch_geometric.nn import GINConv, RGCNConv, global_add_pool


def social_graph(nodes: int = 96, relations: int = 3, features: int = 8, seed: int = 0) -> Data:
    """One multi-relational graph whose node labels depend on features and neighbourhood."""
    g = torch.Generator().manual_seed(seed)
    edges = 6 * nodes
    edge_index = torch.randint(0, nodes, (2, edges), generator=g)
    edge_type = torch.randint(0, relations, (edges,), generator=g)
    x = torch.randn(nodes, features, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    train_mask = torch.rand(nodes, generator=g) < 0.7
    return Data(x=x, edge_index=edge_index, edge_type=edge_type, y=y, train_mask=train_mask)


class RGCN(nn.Module):
    def __init__(self, features: int, hidden: int, relations: int, classes: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Linear(features, hidden)
        self.convs = nn.ModuleList(RGCNConv(hidden, hidden, relations) for _ in range(layers))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_type: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).relu()
        for conv in self.convs:
            h = conv(h, edge_index, edge_type).relu()
        return self.head(h)


class FullGraphRGCN(pl.LightningModule):
    """Node classification on one whole graph per step (a DataLoader over a one-graph dataset)."""

    def __init__(self, nodes: int = 96, hidden: int = 32, relations: int = 3, layers: int = 4, lr: float = 0.01
                 ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = RGCN(8, hidden, relations, 2, layers)

    def training_step(self, batch, batch_idx):
        out = self.model(batch.x, batch.edge_index, batch.edge_type)
        loss = F.cross_entropy(out[batch.train_mask], batch.y[batch.train_mask])
        self.log("train_loss", loss)
        return loss

    def train_dataloader(self):
        return DataLoader([social_graph(self.hparams.nodes, self.hparams.relations)], batch_size=1)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def molecules(n: int, atoms: int = 6, features: int = 8, seed: int = 0, uneven: bool = False) -> list[Data]:
    """Graphs of ``atoms`` nodes each (``uneven``: 4 to 8) with different bonds; the target is a function of the
    structure."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        atoms = 4 + i % 5 if uneven else atoms
        bonds = int(torch.randint(atoms, 3 * atoms, (), generator=g))
        edge_index = torch.randint(0, atoms, (2, bonds), generator=g)
        x = torch.randn(atoms, features, generator=g)
        y = (x[:, 0].sum() + 0.1 * bonds).view(1)
        out.append(Data(x=x, edge_index=edge_index, y=y))
    return out


class GIN(nn.Module):
    def __init__(self, features: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Linear(features, hidden)
        self.convs = nn.ModuleList(
            GINConv(nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden)))
            for _ in range(layers))
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, batch: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(x)
        for conv in self.convs:
            h = conv(h, edge_index).relu()
        if batch is None:  # one value per node
            return self.head(h).squeeze(-1)
        return self.head(global_add_pool(h, batch)).squeeze(-1)


class MoleculeGIN(pl.LightningModule):
    """Molecule-property regression; the loss is a mean over graphs, or (``per_node``) over atoms: with ``uneven``
    node counts a mean over a count that varies from micro-batch to micro-batch (it couples the batch)."""

    def __init__(self, n: int = 48, batch_size: int = 8, hidden: int = 32, layers: int = 4, lr: float = 0.01,
                 uneven: bool = False, per_node: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = GIN(8, hidden, layers)

    def training_step(self, batch, batch_idx):
        if self.hparams.per_node:
            loss = F.mse_loss(self.model(batch.x, batch.edge_index), batch.x[:, 1])
        else:
            loss = F.mse_loss(self.model(batch.x, batch.edge_index, batch.batch), batch.y)
        self.log("train_loss", loss)
        return loss

    def train_dataloader(self):
        return DataLoader(molecules(self.hparams.n, uneven=self.hparams.uneven), batch_size=self.hparams.batch_size)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


MODULES = {"rgcn": FullGraphRGCN, "gin": MoleculeGIN}


def make_module(name: str, **kwargs) -> pl.LightningModule:
    pl.seed_everything(0, workers=False)
    return MODULES[name](**kwargs)
