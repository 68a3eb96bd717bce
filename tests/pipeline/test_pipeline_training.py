"""Pipeline-parallel training of unmodified LightningModules equals one process (fp32, same seed and batch)."""

from __future__ import annotations

import json
import re

import lightning.pytorch as pl
import pytest
import torch

from tests.helpers.launch import REPO, check_script
from tests.helpers.models import reference_loader
from tests.helpers.pipeline_models import KIND, DictData, collate_for, make_module

ATOL = 1e-5


def run_merak(tmp_path, model: str, devices: int, strategy: dict, steps: int = 3, module: dict | None = None,
              trainer: dict | None = None, predict: bool = False, callbacks: dict | None = None,
              ckpt_path: str | None = None, init_module: bool = False) -> list[dict]:
    cfg = {"model": model, "devices": devices, "steps": steps, "strategy": strategy, "module": module or {},
           "trainer": trainer or {}, "predict": predict, "callbacks": callbacks or {}, "ckpt_path": ckpt_path,
           "init_module": init_module}
    tmp_path.mkdir(parents=True, exist_ok=True)
    output = check_script(REPO / "tests/scripts/pipeline_fit.py", str(tmp_path), json.dumps(cfg), timeout=300)
    (tmp_path / "output.txt").write_text(output)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(devices)]


def run_reference(model: str, steps: int = 3, dp: int = 1, module: dict | None = None, accumulate: int = 1,
                  clip: float | None = None) -> dict:
    """One process, same seed and global batch. ``accumulate`` > 1: the reference for batch-coupled models
    (BatchNorm) accumulates gradients over the pipeline's micro-batches instead (DESIGN.md)."""
    module_kwargs = dict(module or {})
    ref = make_module(model, **module_kwargs)
    batch = ref.hparams.batch_size * dp // accumulate
    collate = collate_for(ref.hparams.variable_length)

    def loader():
        data = DictData(KIND[model], ref.hparams.n, seed=0)
        base = reference_loader(data, batch)
        return torch.utils.data.DataLoader(data, batch_size=batch, sampler=base.sampler, collate_fn=collate)

    ref.train_dataloader = loader
    losses = []

    class Rec(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, b, i):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         use_distributed_sampler=False, callbacks=[Rec()], accumulate_grad_batches=accumulate,
                         gradient_clip_val=clip)
    trainer.fit(ref)
    # Lightning reports each accumulated step's loss already divided by ``accumulate``: sum per optimizer step
    per_step = [sum(losses[i:i + accumulate]) for i in range(0, len(losses), accumulate)]
    return {"losses": per_step, "params": {k: v.detach() for k, v in ref.state_dict().items()}}


def assert_matches(ranks: list[dict], ref: dict, atol: float = ATOL) -> None:
    seen = set()
    for rank in ranks:
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(ref["losses"]), atol=atol, rtol=0)
        for key, value in rank["params"].items():
            torch.testing.assert_close(value, ref["params"][key], atol=atol, rtol=0, msg=key)
            seen.add(key)
    missing = [k for k in ref["params"] if k not in seen]
    assert not missing, f"parameters held by no stage: {missing}"


@pytest.mark.multiprocess
@pytest.mark.parametrize(("model", "pp", "schedule"), [
    ("gpt2", 4, "gpipe"),  # GPT-2 at pp=2 with 1f1b: test_tied_embeddings_..., test_variable_sequence_length
    ("llama", 4, "1f1b"),
    ("bert", 2, "gpipe"),
    ("vit", 2, "1f1b"),
    ("resnet", 2, "1f1b"),
    ("sequential", 4, "1f1b"),
    ("custom_loss", 2, "gpipe"),
    ("bart", 2, "1f1b"),
])
def test_pipeline_equals_one_process(tmp_path, model, pp, schedule):
    ranks = run_merak(tmp_path, model, pp, {"pipeline_parallel_size": pp, "pipeline_schedule": schedule,
                                            "num_microbatches": 4, "recompute": "none"})
    # ResNet's BatchNorm couples the samples of a batch: its reference accumulates over the micro-batches
    assert_matches(ranks, run_reference(model, accumulate=4 if model == "resnet" else 1))


@pytest.mark.multiprocess
@pytest.mark.parametrize(("model", "pp", "runs"), [
    ("gpt2", 2, [("gpipe", 0.5), ("shifted_critical_path", "none")]),
])
def test_schedules_and_recompute_equal_one_process(tmp_path, model, pp, runs):
    """Schedules x recompute modes, dropout off: equal to one process with the whole batch. The other
    combinations run with dropout on in ``test_dropout_with_rng_streams_equals_one_process``; recomputation
    replaying torch's own RNG exactly is tested on hand-built stages in ``test_runtime.py``."""
    ref = run_reference(model)
    for i, (schedule, recompute) in enumerate(runs):
        ranks = run_merak(tmp_path / f"run{i}", model, pp, {"pipeline_parallel_size": pp,
                                                            "pipeline_schedule": schedule, "num_microbatches": 4,
                                                            "recompute": recompute})
        assert_matches(ranks, ref)


@pytest.mark.multiprocess
@pytest.mark.parametrize(("model", "pp", "runs"), [
    ("gpt2", 2, [("1f1b", "full"), ("shifted_critical_path", 0.75), ("zbv", 0.5)]),
    ("llama", 4, [("shifted_critical_path", 0.75)]),
    ("llama", 2, [("interleaved_1f1b", "full"), ("zbv", "none"), ("gpipe", 0.5)]),
])
def test_dropout_with_rng_streams_equals_one_process(tmp_path, model, pp, runs):
    """Dropout on, ``rng="microbatch"``: every schedule x recompute mode gives the losses and parameters of one
    process accumulating gradients over the same 4 micro-batches, within 1e-5 over several steps."""
    steps, module = 3, {"dropout": 0.2}
    ref = run_merak(tmp_path / "one", model, 1, {"rng": "microbatch"}, steps=steps,
                    module={**module, "batch_size": 2}, trainer={"accumulate_grad_batches": 4})[0]
    # Lightning reports each accumulated micro-batch's loss divided by 4: the step's loss is their sum
    ref["losses"] = [sum(ref["losses"][i:i + 4]) for i in range(0, 4 * steps, 4)]
    no_dropout = run_reference(model, steps=steps)
    change = max(float((v - no_dropout["params"][k]).abs().max()) for k, v in ref["params"].items())
    assert change > 20 * ATOL  # dropout is really on: the comparison below is not vacuous
    for i, (schedule, recompute) in enumerate(runs):
        ranks = run_merak(tmp_path / f"run{i}", model, pp, {"pipeline_parallel_size": pp, "rng": "microbatch",
                                                            "pipeline_schedule": schedule, "num_microbatches": 4,
                                                            "recompute": recompute}, steps=steps, module=module)
        assert_matches(ranks, ref)


@pytest.mark.multiprocess
def test_eval_predict_logging_and_callbacks_pp2(tmp_path):
    """Forward-only pipeline for validate/predict; what the last stage logs reaches every rank, so
    ModelCheckpoint (monitoring a logged metric), EarlyStopping and the progress bar work on all of them."""
    ranks = run_merak(tmp_path, "gpt2", 2, {"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b",
                                            "num_microbatches": 4, "recompute": "none"}, steps=8, predict=True,
                      trainer={"limit_val_batches": 2, "val_check_interval": 2, "max_epochs": 3},
                      module={"n": 16})
    ref_module = make_module("gpt2", n=16)
    ref_trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=2)
    ref_module.load_state_dict({k: v for rank in ranks for k, v in rank["params"].items()})
    ref_val = ref_trainer.validate(ref_module, verbose=False)[0]
    ref_pred = torch.cat(ref_trainer.predict(ref_module))
    for rank in ranks:
        assert rank["validate"]["val_loss"] == pytest.approx(ref_val["val_loss"], abs=1e-5)
        torch.testing.assert_close(rank["predictions"], ref_pred, atol=1e-5, rtol=0)
        assert "train_loss" in rank["progress_bar_metrics"] and "val_loss" in rank["callback_metrics"]
    assert ranks[0]["callback_metrics"] == pytest.approx(ranks[1]["callback_metrics"])


@pytest.mark.multiprocess
@pytest.mark.parametrize("schedule", ["interleaved_1f1b", "zbv"])
def test_two_stages_per_rank_equal_one_process(tmp_path, schedule):
    """Interleaved 1F1B and ZB-V place two stages on each rank (pp=2: four stages). GPT-2 with wte/lm_head tied
    (across ranks when interleaved, on one rank in the V), recompute and global-norm clipping, and Llama: equal
    to one process; validate and predict pass through all four stages."""
    ranks = run_merak(tmp_path / "gpt2", "gpt2_tied", 2, {"pipeline_parallel_size": 2, "pipeline_schedule": schedule,
                                                          "num_microbatches": 4, "recompute": 0.5},
                      trainer={"gradient_clip_val": 0.5, "limit_val_batches": 2}, predict=True, module={"n": 16})
    assert_matches(ranks, run_reference("gpt2_tied", clip=0.5, module={"n": 16}))
    assert "into 4 stages (pipeline rank of each stage:" in (tmp_path / "gpt2" / "output.txt").read_text()
    ref_module = make_module("gpt2_tied", n=16)
    ref_module.load_state_dict({k: v for rank in ranks for k, v in rank["params"].items()})
    ref_trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=2)
    ref_val = ref_trainer.validate(ref_module, verbose=False)[0]
    ref_pred = torch.cat(ref_trainer.predict(ref_module))
    for rank in ranks:
        assert rank["validate"]["val_loss"] == pytest.approx(ref_val["val_loss"], abs=1e-5)
        torch.testing.assert_close(rank["predictions"], ref_pred, atol=1e-5, rtol=0)
    if schedule == "interleaved_1f1b":  # (Llama under zbv: test_dropout_with_rng_streams_equals_one_process)
        llama = run_merak(tmp_path / "llama", "llama", 2, {"pipeline_parallel_size": 2, "pipeline_schedule": schedule,
                                                           "num_microbatches": 4, "recompute": "none"})
        assert_matches(llama, run_reference("llama"))


@pytest.mark.multiprocess
def test_two_stages_per_rank_checkpoint_consolidates_in_model_order(tmp_path):
    """Interleaved: rank 0 holds stages 0 and 2, rank 1 stages 1 and 3. The consolidated checkpoint lists the
    optimizer state in one process's parameter order (stage 0, 1, 2, 3), so a plain Lightning resume pairs
    each momentum buffer with its own weight (identical blocks would otherwise swap silently)."""
    import subprocess
    import sys

    run_merak(tmp_path, "gpt2", 2, {"pipeline_parallel_size": 2, "pipeline_schedule": "interleaved_1f1b",
                                    "num_microbatches": 4, "recompute": "none"}, steps=2, module={"momentum": 0.9},
              callbacks={"ModelCheckpoint": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}})
    merged = tmp_path / "merged.ckpt"
    subprocess.run([sys.executable, "-m", "lightning_merak.cli", "consolidate", str(tmp_path / "ckpt" / "last.ckpt"),
                    str(merged)], check=True, cwd=REPO, timeout=120)
    plain = torch.load(merged, weights_only=False)
    assert plain["merak_param_order"] == [n for n, _ in make_module("gpt2").named_parameters()]
    assert len(plain["optimizer_states"][0]["state"]) == len(plain["merak_param_order"])


@pytest.mark.multiprocess
def test_checkpoint_and_early_stopping_pp2(tmp_path):
    ranks = run_merak(tmp_path, "gpt2", 2, {"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b",
                                            "num_microbatches": 4, "recompute": "none"}, steps=100,
                      module={"n": 16}, trainer={"limit_val_batches": 1, "max_epochs": 10},
                      callbacks={"ModelCheckpoint": {"dirpath": str(tmp_path / "ckpt"), "monitor": "val_loss",
                                                     "save_last": True},
                                 "EarlyStopping": {"monitor": "val_loss", "patience": 0, "min_delta": 10.0}})
    # EarlyStopping with a huge min_delta stops after the second validation, on both ranks alike
    assert [r["stopped_epoch"] for r in ranks] == [1, 1]
    assert ranks[0]["best_model_path"] == ranks[1]["best_model_path"]
    assert (tmp_path / "ckpt" / "last.ckpt" / "meta.pt").is_file()


@pytest.mark.multiprocess
def test_variable_sequence_length(tmp_path):
    ranks = run_merak(tmp_path, "gpt2", 2, {"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b",
                                            "num_microbatches": 4, "recompute": "none"}, steps=4,
                      module={"variable_length": True})
    assert_matches(ranks, run_reference("gpt2", steps=4, module={"variable_length": True}))


@pytest.mark.multiprocess
def test_dp2_pp2_equals_one_process(tmp_path):
    ranks = run_merak(tmp_path, "llama", 4, {"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b",
                                             "num_microbatches": 2, "recompute": "none"})
    ref = run_reference("llama", dp=2)
    # each replica's loss is its half of the global batch: compare the mean over replicas
    losses = torch.tensor([r["losses"] for r in ranks]).view(2, 2, -1)[:, -1].mean(0)
    torch.testing.assert_close(losses, torch.tensor(ref["losses"]), atol=ATOL, rtol=0)
    for rank in ranks:
        for key, value in rank["params"].items():
            torch.testing.assert_close(value, ref["params"][key], atol=ATOL, rtol=0, msg=key)


@pytest.mark.multiprocess
def test_tied_embeddings_across_stages_and_global_norm_clipping(tmp_path):
    """GPT-2 with wte/lm_head tied: the two stages' copies get their gradients summed, so both stay equal to the
    one tied weight of one process; clipping by the global norm over the stages counts that weight once."""
    ranks = run_merak(tmp_path, "gpt2_tied", 2, {"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b",
                                                 "num_microbatches": 4, "recompute": "none"},
                      trainer={"gradient_clip_val": 0.5})
    assert_matches(ranks, run_reference("gpt2_tied", clip=0.5))
    clipped = run_merak(tmp_path / "clip", "sequential", 2, {"pipeline_parallel_size": 2, "num_microbatches": 4,
                                                             "pipeline_schedule": "1f1b", "recompute": "none"},
                        trainer={"gradient_clip_val": 0.05})
    assert_matches(clipped, run_reference("sequential", clip=0.05))


@pytest.mark.multiprocess
def test_auto_schedule_and_real_timeline(tmp_path):
    """The default "auto": planned on 4- and 2-stage cuts before step 1, a two-stage-per-rank schedule wins the
    simulation for this GPT-2 (recompute 0.5 on every candidate), the model is cut into 4 stages for it, the
    choice is made again from step 1's measured times within that placement, and the run equals one process."""
    trace = tmp_path / "trace"
    ranks = run_merak(tmp_path, "gpt2", 2, {"pipeline_parallel_size": 2, "num_microbatches": 4, "recompute": 0.5,
                                            "trace_dir": str(trace)}, steps=4)
    # the schedules are rebuilt after the re-choice (recompute re-applied): the run still equals one process
    assert_matches(ranks, run_reference("gpt2", steps=4))
    output = (tmp_path / "output.txt").read_text()
    chosen = re.search(r"pipeline_schedule='auto' chose (\S+) \(2 stage\(s\) per rank\).*runner-up (\S+)", output)
    assert chosen and chosen[1] in ("interleaved_1f1b", "zbv"), output[-3000:]
    assert "into 4 stages (pipeline rank of each stage:" in output
    assert re.search(r"re-chosen from the times measured in step 1: (interleaved_1f1b|zbv)", output)
    assert "recomputes stage 0 4/4 forwards (50% of its forward FLOPs)" in output

    events = json.loads((trace / "pipeline_step0.json").read_text())["traceEvents"]
    actions = [e["name"] for e in events if e.get("ph") == "X"]
    # every rank's forwards and (input-)backwards of 4 stages x 4 micro-batches, gathered to rank 0
    assert {e["tid"] for e in events if e.get("ph") == "X"} == {0, 1}
    assert sum(1 for a in actions if "F" in a) == 16 and sum(1 for a in actions if "B" in a or "I" in a) == 16
