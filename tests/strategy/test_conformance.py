"""MerakStrategy (data parallel, pp = tp = 1) against a one-process run of the same module and seed.

All scenarios run in one launch of ``tests/scripts/conformance.py`` on 2 gloo processes; the reference runs
here, in the pytest process, reading per step the samples both replicas read together.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.launch import REPO, check_script
from tests.helpers.scenarios import run

SCENARIOS = ["fit", "accumulate", "clip", "bf16", "eval", "checkpoint", "early_stopping", "max_steps", "datamodule"]
ATOL = 1e-6


@pytest.fixture(scope="module")
def merak_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("merak_dp")
    check_script(REPO / "tests/scripts/conformance.py", str(out), json.dumps({}), *SCENARIOS, timeout=600)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return run(SCENARIOS, reference=True, root=tmp_path_factory.mktemp("reference"))


def _global_losses(ranks: list[dict], key: str, name: str) -> torch.Tensor:
    return torch.tensor([r[name][key] for r in ranks]).mean(0)


def _assert_params(ranks: list[dict], ref: dict, name: str, atol: float = ATOL) -> None:
    for rank in ranks:
        for key, value in ref[name]["params"].items():
            torch.testing.assert_close(rank[name]["params"][key], value, atol=atol, rtol=0, msg=f"{name}: {key}")


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["fit", "accumulate", "clip", "datamodule"])
def test_training_matches_one_process(merak_results, reference, name):
    ranks, _ = merak_results
    _assert_params(ranks, reference, name)
    torch.testing.assert_close(_global_losses(ranks, "losses", name), torch.tensor(reference[name]["losses"]),
                               atol=ATOL, rtol=0)


@pytest.mark.multiprocess
def test_validation_metrics_and_sync_dist(merak_results, reference):
    ranks, _ = merak_results
    for rank in ranks:  # sync_dist=True and the torchmetrics metric give the global value on every rank
        assert rank["fit"]["val_losses"] == pytest.approx(reference["fit"]["val_losses"], abs=1e-6)
        assert rank["fit"]["val_mse"] == pytest.approx(reference["fit"]["val_mse"], abs=1e-6)


@pytest.mark.multiprocess
def test_bf16_mixed_matches_within_bf16_tolerance(merak_results, reference):
    # bf16 rounds partial sums differently on half batches, so equality holds to bf16 precision only
    ranks, _ = merak_results
    _assert_params(ranks, reference, "bf16", atol=2e-2)
    assert ranks[0]["bf16"]["params"]["net.0.weight"].dtype == torch.float32


@pytest.mark.multiprocess
def test_validate_test_predict(merak_results, reference):
    ranks, _ = merak_results
    for key in ("val_loss", "val_mse", "test_loss"):
        for rank in ranks:
            assert rank["eval"][key] == pytest.approx(reference["eval"][key], abs=1e-6)
    # DistributedSampler(shuffle=False) gives rank r the samples r, r+2, ...: interleave them back
    preds = torch.empty_like(reference["eval"]["preds"])
    preds[0::2], preds[1::2] = ranks[0]["eval"]["preds"], ranks[1]["eval"]["preds"]
    torch.testing.assert_close(preds, reference["eval"]["preds"], atol=ATOL, rtol=0)


@pytest.mark.multiprocess
def test_checkpoint_resume_continues_identically(merak_results, reference):
    ranks, _ = merak_results
    for rank in ranks:
        res = rank["checkpoint"]
        n_done = len(res["part_losses"])
        assert res["resumed_losses"] == pytest.approx(res["full_losses"][n_done:], abs=1e-6)
        for key, value in res["full_params"].items():
            torch.testing.assert_close(res["params"][key], value, atol=ATOL, rtol=0)
    ref = reference["checkpoint"]
    assert ranks[0]["checkpoint"]["best_model_score"] == pytest.approx(ref["best_model_score"], abs=1e-6)
    best = Path(ranks[0]["checkpoint"]["best_model_path"])
    # sharded: a DCP folder, one file per rank plus Lightning's metadata (as ModelParallelStrategy writes) and
    # the completion marker, written last
    assert {p.name for p in best.iterdir()} == {"meta.pt", ".metadata", "__0_0.distcp", "__1_0.distcp",
                                                 "merak_checkpoint.json"}


@pytest.mark.multiprocess
def test_early_stopping_and_max_steps(merak_results, reference):
    ranks, _ = merak_results
    for rank in ranks:
        for key in ("stopped_epoch", "current_epoch", "global_step"):
            assert rank["early_stopping"][key] == reference["early_stopping"][key]
        assert rank["max_steps"]["global_step"] == 10
        assert rank["max_steps"]["val_losses"] == pytest.approx(reference["max_steps"]["val_losses"], abs=1e-6)
    _assert_params(ranks, reference, "max_steps")


@pytest.mark.multiprocess
def test_consolidated_checkpoint_loads_and_resumes_in_plain_script(merak_results, tmp_path):
    ranks, out = merak_results
    folder = out / "work" / "checkpoint" / "ckpts" / "last.ckpt"
    assert (folder / "meta.pt").is_file() and (folder / ".metadata").is_file()
    target = tmp_path / "consolidated.ckpt"
    subprocess.run([sys.executable, "-m", "lightning_merak.cli", "consolidate", str(folder), str(target)],
                   check=True, cwd=REPO)
    merged = torch.load(target, weights_only=False)
    # keys equal the unwrapped module's (test_model_parallel_integration.py::test_strategy_state_dict)
    from tests.helpers.models import RegressionModule

    assert set(merged["state_dict"]) == set(RegressionModule().state_dict())
    assert len(merged["optimizer_states"]) == 1
    script = f"""
import sys, torch
sys.path.insert(0, {str(REPO)!r})
from tests.helpers.scenarios import ReferenceModule, _trainer
from pathlib import Path
m = ReferenceModule.load_from_checkpoint({str(target)!r})
trainer = _trainer(True, {{}}, Path({str(tmp_path)!r}), max_epochs=4, limit_val_batches=2)
trainer.fit(m, ckpt_path={str(target)!r})
torch.save(m.step_losses, {str(tmp_path / "losses.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, capture_output=True)
    resumed = torch.load(tmp_path / "losses.pt")
    full = torch.tensor([r["checkpoint"]["full_losses"] for r in ranks]).mean(0)
    n_done = len(ranks[0]["checkpoint"]["part_losses"])
    torch.testing.assert_close(torch.tensor(resumed), full[n_done:], atol=1e-6, rtol=0)
