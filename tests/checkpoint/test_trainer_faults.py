"""Sharded checkpoints through a Trainer on 2 gloo processes (dp=2), in one launch of
``tests/scripts/checkpoint_faults.py``: a save that fails midway, a resume, and poisoned files."""

from __future__ import annotations

import pytest
import torch

from lightning_merak.checkpoint import COMPLETE_FILE
from tests.helpers.launch import REPO, check_script

STEPS_PER_EPOCH = 4  # 32 samples, 4 per rank and step, 2 ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoint_faults")
    check_script(REPO / "tests/scripts/checkpoint_faults.py", str(out), timeout=300)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], out


@pytest.mark.multiprocess
def test_failed_resave_keeps_the_previous_last_checkpoint(runs):
    ranks, _ = runs
    for res in ranks:
        assert "injected fault" in res["fault"]
        assert len(res["part_losses"]) == 2 * STEPS_PER_EPOCH  # epoch 1 trained, its last.ckpt save failed
        # the partial save stays hidden, without a marker, and is cleared by the next save to last.ckpt
        assert res["after_fault"][1:] == [f"epoch=1-step={2 * STEPS_PER_EPOCH}.ckpt", "last.ckpt"]
        assert res["after_fault"][0].startswith(".merak-partial-")
        assert "last.ckpt" in res["after_resume"] and not any(n.startswith(".") for n in res["after_resume"])
        # resumed from epoch 0's last.ckpt (ckpt_path="last"): the same losses as the uninterrupted run
        assert len(res["resumed_losses"]) == STEPS_PER_EPOCH
        torch.testing.assert_close(torch.tensor(res["resumed_losses"]),
                                   torch.tensor(res["full_losses"][STEPS_PER_EPOCH:]), atol=1e-6, rtol=0)


@pytest.mark.multiprocess
def test_entries_added_in_on_save_checkpoint_come_back(runs):
    ranks, _ = runs
    for res in ranks:
        note = res["loaded_note"]
        assert note["step"] == STEPS_PER_EPOCH and note["text"] == "kept"
        torch.testing.assert_close(note["tensor"], torch.arange(3) * STEPS_PER_EPOCH)


@pytest.mark.multiprocess
def test_poisoned_files_refused_by_name_without_running_them(runs):
    ranks, out = runs
    assert ranks[0]["pristine_files"] == [".metadata", COMPLETE_FILE, "meta.pt"]
    for res in ranks:
        for name, (folder, error) in res["poisoned"].items():
            assert error is not None and error.startswith("CheckpointError: "), (name, error)
            named = COMPLETE_FILE if name == "*" else name  # with every file poisoned, the marker is read first
            assert f"{folder}/{named} " in error, error
    assert not (out / "pwned").exists()
