"""``swap_dir``: where DELTA's swap file goes on CPU-only runs. Checked like ``trace_dir``; by default a disk-backed
temporary folder, since swapping into a RAM-backed /tmp (tmpfs) would keep the bytes in memory."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from lightning_merak import MerakStrategy
from lightning_merak.config import MerakConfig, MerakConfigError
from lightning_merak.memory import DeltaScheduler
from lightning_merak.memory.swap import RAM_FILESYSTEMS, FileSwapTier, default_swap_dir, filesystem_type


def _swap_files(folder: str) -> list[str]:
    """The unlinked swap files this process holds open in ``folder``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if os.path.dirname(target) == os.path.realpath(folder) and os.path.basename(target).startswith("delta-swap-"):
            found.append(target)
    return found


def test_swap_file_goes_to_swap_dir_and_round_trips(tmp_path):
    folder = tmp_path / "made" / "for swap"  # created if missing
    tier = FileSwapTier(folder)
    data = torch.arange(5000, dtype=torch.int32).view(torch.uint8)
    slot = tier.swap_out(data.clone())
    assert torch.equal(tier.swap_in(slot).wait(), data)
    files = _swap_files(str(folder))
    assert len(files) == 1 and files[0].endswith("(deleted)")  # unlinked: gone with the process, even on a crash
    assert os.listdir(folder) == []
    tier.close()
    assert _swap_files(str(folder)) == []


def test_delta_scheduler_passes_swap_dir_to_its_tier(tmp_path, zoo):
    delta = DeltaScheduler(zoo.build("gpt2"), memory_budget="1GiB", swap_dir=str(tmp_path))
    assert delta.tier_for(torch.device("cpu")).swap_dir == str(tmp_path)
    delta.close()
    default = DeltaScheduler(zoo.build("gpt2"), memory_budget="1GiB")
    assert default.tier_for(torch.device("cpu")).swap_dir == default_swap_dir()
    default.close()


def test_default_is_disk_backed_even_when_the_temp_folder_is_tmpfs(monkeypatch):
    ram = next((m for m in ("/dev/shm", "/run/shm") if os.path.isdir(m) and os.access(m, os.W_OK)
                and filesystem_type(m) in RAM_FILESYSTEMS), None)
    if ram is None:
        pytest.skip("no writable tmpfs mount on this machine to stand in for a RAM-backed /tmp")
    monkeypatch.setattr(tempfile, "tempdir", ram)  # what TMPDIR=/dev/shm (or a tmpfs /tmp) gives
    assert tempfile.gettempdir() == ram
    chosen = default_swap_dir()
    assert chosen != ram and filesystem_type(chosen) not in RAM_FILESYSTEMS
    assert os.access(chosen, os.W_OK)


def test_default_is_the_temp_folder_when_it_is_on_disk():
    temp = tempfile.gettempdir()
    if filesystem_type(temp) in RAM_FILESYSTEMS:
        pytest.skip(f"this machine's temporary folder {temp} is RAM-backed")
    assert default_swap_dir() == temp


def test_filesystem_type_reads_the_longest_mount_point():
    assert filesystem_type("/proc/self") == "proc"
    assert filesystem_type("/") not in (None, "proc")


@pytest.mark.parametrize(("value", "match"), [
    (3, "swap_dir=3 is not a folder path"),
    ("", "swap_dir='' is not a folder path"),
])
def test_bad_swap_dir_values(value, match):
    with pytest.raises(MerakConfigError, match=match):
        MerakConfig(memory_manager="delta", swap_dir=value)


def test_swap_dir_inside_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(MerakConfigError, match=r"swap_dir='.*afile/sub' cannot be created: .*afile is a file"):
        MerakStrategy(memory_manager="delta", swap_dir=str(afile / "sub"))


def test_swap_dir_not_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root)")
        with pytest.raises(MerakConfigError, match=r"swap_dir='.*locked' cannot be written"):
            MerakStrategy(memory_manager="delta", swap_dir=str(locked))
    finally:
        locked.chmod(0o700)


def test_swap_dir_without_delta_is_refused(tmp_path):
    with pytest.raises(MerakConfigError, match=r"swap_dir='.*' is set but nothing uses it: .*memory_manager='delta'"):
        MerakStrategy(swap_dir=str(tmp_path))


def test_swap_dir_reaches_the_config(tmp_path):
    assert MerakStrategy(memory_manager="delta", swap_dir=str(tmp_path)).config.swap_dir == str(tmp_path)
