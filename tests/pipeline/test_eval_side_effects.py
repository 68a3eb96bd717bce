"""Evaluation steps under a pipeline have their side effects as under DDP (issue 12): every rank runs the user's
``validation_step`` / ``test_step`` / ``predict_step``, its model call answered with the last stage's output, so
appends to ``self``, torchmetrics updates and ``self.log(on_epoch=True)`` happen alike on every rank and the
``on_*_epoch_end`` reductions equal one process's for the rank's data-parallel share."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from tests.helpers.launch import REPO, check_script
from tests.pipeline.semantics_models import make, regression_data

ATOL = 1e-5
DP, PP = 2, 2


def run_semantics(tmp_path, model: str, devices: int, strategy: dict, steps: int = 0, evaluate: bool = False,
                  predict: bool = False, module: dict | None = None) -> list[dict]:
    """``tests/scripts/semantics_fit.py`` on ``devices`` processes; what each rank saved, and its output text."""
    cfg = {"model": model, "devices": devices, "strategy": strategy, "steps": steps, "evaluate": evaluate,
           "predict": predict, "module": module or {}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    output = check_script(REPO / "tests/scripts/semantics_fit.py", str(tmp_path), json.dumps(cfg), timeout=300)
    (tmp_path / "output.txt").write_text(output)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(devices)]


def one_process(share: int | None) -> dict:
    """validate, test and predict in one process, over replica ``share``'s samples (Lightning's distributed
    sampler without shuffling: every DP-th sample), or over all of them."""
    module = make("eval_side_effects")

    def loader(seed: int) -> DataLoader:
        data = regression_data(module.hparams.n, seed)
        if share is not None:
            data = Subset(data, range(share, len(data), DP))
        return DataLoader(data, batch_size=module.hparams.batch_size)

    module.val_dataloader, module.test_dataloader = (lambda: loader(1)), (lambda: loader(2))
    module.predict_dataloader = lambda: loader(3)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    return {"validate": trainer.validate(module, verbose=False)[0], "test": trainer.test(module, verbose=False)[0],
            "predictions": torch.cat(trainer.predict(module)), "reduced": module.reduced}


@pytest.mark.multiprocess
def test_eval_side_effects_on_every_rank_equal_one_process_per_replica(tmp_path):
    ranks = run_semantics(tmp_path, "eval_side_effects", DP * PP, {"data_parallel_size": DP,
                                                                   "pipeline_parallel_size": PP,
                                                                   "pipeline_schedule": "1f1b"}, evaluate=True)
    assert "Merak partition of `net`" in (tmp_path / "output.txt").read_text()
    whole = one_process(None)
    for rank, seen in enumerate(ranks):
        share = one_process(rank // PP)  # the mesh is (dp, pp, tp): ranks 0, 1 are replica 0
        for stage in ("val", "test"):
            # the list appended in the step and reduced at the epoch end: this replica's samples, on every stage
            assert len(seen["reduced"][stage]) == 1, (rank, seen["reduced"])
            got, ref = seen["reduced"][stage][0], share["reduced"][stage][0]
            assert got["count"] == ref["count"] == 16
            assert got["mean"] == pytest.approx(ref["mean"], abs=ATOL), (rank, stage)
            assert got["max"] == pytest.approx(ref["max"], abs=ATOL), (rank, stage)
        for fn in ("validate", "test"):
            stage = "val" if fn == "validate" else "test"
            # logged with on_epoch=True (no sync_dist) and the reduction: the replica's values
            for name in (f"{stage}_loss", f"{stage}_reduced"):
                assert seen[fn][name] == pytest.approx(share[fn][name], abs=ATOL), (rank, name)
            # a torchmetrics Metric syncs over the data-parallel group: the whole data set's value
            assert seen[fn][f"{stage}_metric"] == pytest.approx(whole[fn][f"{stage}_metric"], abs=ATOL), rank
        torch.testing.assert_close(seen["predictions"], share["predictions"], atol=ATOL, rtol=0)
    for replica in range(DP):  # the stages of one pipeline hold the very same values
        first, last = ranks[replica * PP], ranks[replica * PP + PP - 1]
        assert first["reduced"] == last["reduced"]
        assert first["validate"] == last["validate"] and first["test"] == last["test"]
        assert torch.equal(first["predictions"], last["predictions"])
