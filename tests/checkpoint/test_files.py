"""Sharded checkpoint files on one process: completion marker, safe loading, refusals (no Trainer)."""

from __future__ import annotations

import shutil

import pytest
import torch

from lightning_merak import checkpoint as ckpt
from lightning_merak import cli
from lightning_merak.checkpoint import COMPLETE_FILE, CheckpointError
from lightning_merak.strategy import MerakStrategy
from tests.checkpoint.payload import non_shard_files, poison
from tests.helpers.models import RegressionModule

# DCP says so for every save and load without a process group, which is the point here
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


@pytest.fixture
def saved(tmp_path):
    model, opt = _model_and_optimizer(0)
    path = tmp_path / "x.ckpt"
    ckpt.save_sharded(path, {"epoch": 3, "loops": {"step": torch.tensor(7)}}, model, [opt], is_rank_zero=True)
    return path, model, opt


def test_roundtrip_and_layout(saved):
    path, model, opt = saved
    assert {p.name for p in path.iterdir()} == {COMPLETE_FILE, "meta.pt", ".metadata", "__0_0.distcp"}
    assert [p.name for p in path.parent.iterdir()] == ["x.ckpt"]  # no staging folder left behind
    other, other_opt = _model_and_optimizer(1)
    meta = ckpt.load(path, other, [other_opt])
    assert meta["epoch"] == 3 and int(meta["loops"]["step"]) == 7
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(opt.state_dict()["state"], other_opt.state_dict()["state"], atol=0, rtol=0)


def test_every_non_shard_file_refused_when_poisoned(saved, tmp_path):
    path, model, opt = saved
    marker = tmp_path / "pwned"
    for name in [p.name for p in non_shard_files(path)]:
        copy = tmp_path / f"poisoned{name}"
        shutil.copytree(path, copy)
        poison(copy / name, marker)
        with pytest.raises(CheckpointError, match=str(copy / name)):
            ckpt.load(copy, model, [opt])
        with pytest.raises(CheckpointError, match=str(copy / name)):
            ckpt.consolidate(copy, tmp_path / "out.ckpt")
        assert cli.main(["consolidate", str(copy), str(tmp_path / "out.ckpt")]) == 1
        assert not marker.exists(), name
    assert not (tmp_path / "out.ckpt").exists()


def test_strategy_load_checkpoint_honours_weights_only(tmp_path):
    """``weights_only=False`` is the user's explicit trust: the pickle is unpickled in full (and runs).

    (Lightning 2.6's Trainer does not pass ``fit(weights_only=...)`` on to strategies that restore after setup,
    so through the Trainer a MerakStrategy checkpoint always loads as data only.)"""
    module = RegressionModule(hidden=4, depth=2)
    strategy = MerakStrategy()
    strategy.connect(module)
    path = tmp_path / "m.ckpt"
    ckpt.save_sharded(path, {"epoch": 1}, module, [], is_rank_zero=True)
    assert strategy.load_checkpoint(str(path))["epoch"] == 1
    marker = tmp_path / "trusted"
    poison(path / "meta.pt", marker)
    for weights_only in (None, True):
        with pytest.raises(CheckpointError, match="meta.pt cannot be loaded safely"):
            strategy.load_checkpoint(str(path), weights_only=weights_only)
        assert not marker.exists()
    strategy.load_checkpoint(str(path), weights_only=False)
    assert marker.exists()


def test_poisoned_plain_file_refused(saved, tmp_path):
    path, model, opt = saved
    ckpt.consolidate(path, tmp_path / "full.ckpt")
    ckpt.load(tmp_path / "full.ckpt", model, [opt])  # a consolidated file loads as data only
    poison(tmp_path / "full.ckpt", tmp_path / "pwned")
    with pytest.raises(CheckpointError, match="full.ckpt cannot be loaded safely"):
        ckpt.load(tmp_path / "full.ckpt", model, [opt])
    assert not (tmp_path / "pwned").exists()


def test_incomplete_folder_is_not_loaded_removed_or_overwritten(saved, tmp_path):
    path, model, opt = saved
    (path / COMPLETE_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{path} is a folder but not a complete Merak checkpoint"):
        ckpt.load(path, model, [opt])
    with pytest.raises(CheckpointError, match=f"refusing to delete {path}"):
        MerakStrategy().remove_checkpoint(str(path))
    with pytest.raises(CheckpointError, match="does not overwrite it"):
        ckpt.save_sharded(path, {}, model, [opt], is_rank_zero=True)
    assert (path / "meta.pt").is_file()
    user = tmp_path / "my_data"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="refusing to delete"):
        MerakStrategy().remove_checkpoint(user)
    assert (user / "notes.txt").read_text() == "keep"


def test_complete_folder_and_link_removed(saved):
    path, _, _ = saved
    link = path.with_name("last.ckpt")  # ModelCheckpoint(save_last="link")
    link.symlink_to(path)
    MerakStrategy().remove_checkpoint(str(link))
    assert not link.is_symlink() and (path / COMPLETE_FILE).is_file()
    MerakStrategy().remove_checkpoint(str(path))
    assert not path.exists()


def test_remote_urls_and_checkpoint_io_plugins_refused_at_save(tmp_path, monkeypatch):
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"'s3://bucket/x.ckpt' is a s3:// URL"):
        MerakStrategy().save_checkpoint({}, "s3://bucket/x.ckpt")
    assert list(tmp_path.iterdir()) == []  # no folder named "s3:"
    with pytest.raises(CheckpointError, match="memory:// URL"):
        MerakStrategy().load_checkpoint("memory://x.ckpt")
    assert ckpt.local_path(f"file://{tmp_path}/x.ckpt") == tmp_path / "x.ckpt"
    with pytest.raises(CheckpointError, match="checkpoint_io=AsyncCheckpointIO is not supported"):
        MerakStrategy(checkpoint_io=AsyncCheckpointIO()).save_checkpoint({}, tmp_path / "x.ckpt")


def test_poisoned_non_tensor_entry_in_a_shard_refused(tmp_path, monkeypatch):
    """DCP unpickles a shard's non-tensor entries (our optimizer bookkeeping) with weights_only=False."""
    from tests.checkpoint.payload import CreatesFile

    model, opt = _model_and_optimizer(0)
    marker = tmp_path / "pwned"
    entry = ckpt._optimizer_entry

    def poisoned_entry(*args, **kwargs):
        out = entry(*args, **kwargs)
        out["group_of"] = {name: CreatesFile(marker) for name in out["group_of"]}
        return out

    monkeypatch.setattr(ckpt, "_optimizer_entry", poisoned_entry)
    ckpt.save_sharded(tmp_path / "x.ckpt", {}, model, [opt], is_rank_zero=True)
    monkeypatch.setattr(ckpt, "_optimizer_entry", entry)
    with pytest.raises(CheckpointError, match=r"'optimizer_0.group_of.0.weight' \(in a .distcp shard\) cannot be loaded safely: "
                       "WeightsUnpickler error: Unsupported global: GLOBAL io.open"):
        ckpt.load(tmp_path / "x.ckpt", model, [opt])
    assert not marker.exists()
