"""Parts of Lightning's own strategy tests (tests_pytorch/strategies: test_custom_strategy,
test_model_parallel, test_model_parallel_integration) restated for MerakStrategy."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.environments import LightningEnvironment

from lightning_merak import MerakStrategy


def test_restore_contract_like_model_parallel_strategy():
    # the stage/shard must exist before its part of the checkpoint is loaded; optimizer state comes from the
    # sharded checkpoint, not from Lightning's generic path (test_custom_strategy.py::test_custom_..._restore)
    strategy = MerakStrategy()
    assert strategy.restore_checkpoint_after_setup is True
    assert strategy.lightning_restore_optimizer is False
    assert strategy.is_distributed is True


def test_device_mesh_only_after_setup():
    with pytest.raises(RuntimeError, match="exists only after the process group is set up"):
        MerakStrategy().device_mesh  # noqa: B018


def test_sampler_kwargs_follow_the_data_parallel_coordinate():
    strategy = MerakStrategy(pipeline_parallel_size=2)
    strategy.parallel_devices = [torch.device("cpu")] * 4
    strategy.cluster_environment = LightningEnvironment()
    assert strategy.sizes == (2, 2, 1)
    # without a mesh (before setup) a single replica is reported
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 1, "rank": 0}


def test_trainer_accepts_instance_and_name_alike():
    for strategy in ("merak", MerakStrategy(pipeline_parallel_size=1)):
        trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, logger=False)
        assert isinstance(trainer.strategy, MerakStrategy)
        assert trainer.strategy.launcher is None or trainer.strategy.launcher.is_interactive_compatible is False
