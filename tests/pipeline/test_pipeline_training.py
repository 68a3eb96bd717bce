"""Pipeline-parallel training of unmodified LightningModules equals one process (fp32, same seed and batch).

The runs share launches (``GROUPS``: several fits one after another in one launch of ``pipeline_fit.py``);
each test asserts on its own runs."""

from __future__ import annotations

import json
import re

import lightning.pytorch as pl
import pytest
import torch

from tests.helpers.launch import REPO, check_script
from tests.helpers.models import reference_loader
from tests.helpers.pipeline_models import KIND, DictData, collate_for, make_module
from tests.helpers.pipeline_runs import Group, Launches

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


_REFERENCES: dict[str, dict] = {}


def run_reference(model: str, steps: int = 3, dp: int = 1, module: dict | None = None, accumulate: int = 1,
                  clip: float | None = None) -> dict:
    """One process, same seed and global batch. ``accumulate`` > 1: the reference for batch-coupled models
    (BatchNorm) accumulates gradients over the pipeline's micro-batches instead (DESIGN.md). Computed once per
    arguments in a session (several tests compare against the same one)."""
    key = json.dumps([model, steps, dp, module or {}, accumulate, clip], sort_keys=True)
    if key not in _REFERENCES:
        _REFERENCES[key] = _one_process(model, steps, dp, module, accumulate, clip)
    ref = _REFERENCES[key]
    return {"losses": list(ref["losses"]), "params": dict(ref["params"])}


def _one_process(model: str, steps: int, dp: int, module: dict | None, accumulate: int, clip: float | None) -> dict:
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


def _pipeline(pp: int, schedule: str, recompute="none", **kwargs) -> dict:
    return {"pipeline_parallel_size": pp, "pipeline_schedule": schedule, "num_microbatches": 4, "recompute": recompute,
            **kwargs}


# (model, pp, schedule): GPT-2 at pp=2 with 1f1b: test_tied_embeddings_..., test_variable_sequence_length
MODELS = [("gpt2", 4, "gpipe"), ("llama", 4, "1f1b"), ("bert", 2, "gpipe"), ("vit", 2, "1f1b"), ("resnet", 2, "1f1b"),
          ("sequential", 4, "1f1b"), ("custom_loss", 2, "gpipe"), ("bart", 2, "1f1b")]
# (model, pp, [(schedule, recompute), ...]), dropout off
SCHEDULES = [("gpt2", 2, [("gpipe", 0.5), ("shifted_critical_path", "none")])]
# the same with dropout on and rng="microbatch"
DROPOUT = [("gpt2", 2, [("1f1b", "full"), ("shifted_critical_path", 0.75), ("zbv", 0.5)]),
           ("llama", 4, [("shifted_critical_path", 0.75)]),
           ("llama", 2, [("interleaved_1f1b", "full"), ("zbv", "none"), ("gpipe", 0.5)])]
DROPOUT_STEPS, DROPOUT_MODULE = 3, {"dropout": 0.2}


def _models(devices: int) -> dict[str, dict]:
    runs = {f"model-{m}": {"model": m, "strategy": _pipeline(pp, schedule)}
            for m, pp, schedule in MODELS if pp == devices}
    for model, pp, pairs in SCHEDULES:
        runs.update({f"schedules-{model}-{pp}-{i}": {"model": model, "strategy": _pipeline(pp, schedule, recompute)}
                     for i, (schedule, recompute) in enumerate(pairs) if pp == devices})
    return runs


def _dropout(devices: int) -> dict[str, dict]:
    runs = {}
    for model, pp, pairs in DROPOUT:
        runs.update({f"dropout-{model}-{pp}-{i}": {"model": model, "steps": DROPOUT_STEPS, "module": DROPOUT_MODULE,
                                                   "strategy": _pipeline(pp, schedule, recompute, rng="microbatch")}
                     for i, (schedule, recompute) in enumerate(pairs) if pp == devices})
    return runs


# Each group of runs is one launch (tests/helpers/pipeline_runs.py)
GROUPS: dict[str, Group] = {
    "one_process": (1, lambda root: {
        f"dropout-reference-{m}": {"model": m, "steps": DROPOUT_STEPS, "strategy": {"rng": "microbatch"},
                                   "module": {**DROPOUT_MODULE, "batch_size": 2},
                                   "trainer": {"accumulate_grad_batches": 4}} for m in ("gpt2", "llama")}, ()),
    "four": (4, lambda root: {**_models(4), **_dropout(4), "dp2_pp2": {
        "model": "llama", "strategy": {**_pipeline(2, "1f1b"), "num_microbatches": 2}}}, ()),
    "models": (2, lambda root: _models(2), ()),
    "dropout": (2, lambda root: _dropout(2), ()),
    "evaluation": (2, lambda root: {
        "eval_predict": {"model": "gpt2", "strategy": _pipeline(2, "1f1b"), "steps": 8, "predict": True,
                         "module": {"n": 16}, "trainer": {"limit_val_batches": 2, "val_check_interval": 2,
                                                          "max_epochs": 3}},
        **{f"two_stages-{schedule}": {"model": "gpt2_tied", "strategy": _pipeline(2, schedule, 0.5), "predict": True,
                                      "trainer": {"gradient_clip_val": 0.5, "limit_val_batches": 2},
                                      "module": {"n": 16}} for schedule in ("interleaved_1f1b", "zbv")},
        "two_stages-llama": {"model": "llama", "strategy": _pipeline(2, "interleaved_1f1b")},
        "interleaved_checkpoint": {"model": "gpt2", "strategy": _pipeline(2, "interleaved_1f1b"), "steps": 2,
                                   "module": {"momentum": 0.9},
                                   "callbacks": {"ModelCheckpoint": {"dirpath": str(root / "evaluation" / "ckpt"),
                                                                     "save_last": True}}}}, ()),
    "features": (2, lambda root: {
        "early_stopping": {"model": "gpt2", "strategy": _pipeline(2, "1f1b"), "steps": 100, "module": {"n": 16},
                           "trainer": {"limit_val_batches": 1, "max_epochs": 10},
                           "callbacks": {"ModelCheckpoint": {"dirpath": str(root / "features" / "ckpt"),
                                                             "monitor": "val_loss", "save_last": True},
                                         "EarlyStopping": {"monitor": "val_loss", "patience": 0, "min_delta": 10.0}}},
        "variable_length": {"model": "gpt2", "strategy": _pipeline(2, "1f1b"), "steps": 4,
                            "module": {"variable_length": True}},
        "tied": {"model": "gpt2_tied", "strategy": _pipeline(2, "1f1b"), "trainer": {"gradient_clip_val": 0.5}},
        "budget": {"model": "gpt2_tied", "strategy": _pipeline(2, "1f1b", "stage_aware", memory_budget="1GB"),
                   "module": {"momentum": 0.9}},
        "clipped": {"model": "sequential", "strategy": _pipeline(2, "1f1b"), "trainer": {"gradient_clip_val": 0.05}},
        "auto": {"model": "gpt2", "steps": 4, "strategy": {
            "pipeline_parallel_size": 2, "num_microbatches": 4, "recompute": 0.5,
            "trace_dir": str(root / "features" / "trace")}}}, ()),
}


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Launches:
    return Launches(tmp_path_factory.mktemp("pipeline_training"), GROUPS)


@pytest.mark.multiprocess
@pytest.mark.parametrize(("model", "pp", "schedule"), MODELS)
def test_pipeline_equals_one_process(launched, model, pp, schedule):
    # ResNet's BatchNorm couples the samples of a batch: its reference accumulates over the micro-batches
    assert_matches(launched[f"model-{model}"], run_reference(model, accumulate=4 if model == "resnet" else 1))


@pytest.mark.multiprocess
@pytest.mark.parametrize(("model", "pp", "runs"), SCHEDULES)
def test_schedules_and_recompute_equal_one_process(launched, model, pp, runs):
    """Schedules x recompute modes, dropout off: equal to one process with the whole batch. The other
    combinations run with dropout on in ``test_dropout_with_rng_streams_equals_one_process``; recomputation
    replaying torch's own RNG exactly is tested on hand-built stages in ``test_runtime.py``."""
    ref = run_reference(model)
    for i in range(len(runs)):
        assert_matches(launched[f"schedules-{model}-{pp}-{i}"], ref)


@pytest.mark.multiprocess
@pytest.mark.parametrize(("model", "pp", "runs"), DROPOUT)
def test_dropout_with_rng_streams_equals_one_process(launched, model, pp, runs):
    """Dropout on, ``rng="microbatch"``: every schedule x recompute mode gives the losses and parameters of one
    process accumulating gradients over the same 4 micro-batches, within 1e-5 over several steps."""
    ref = dict(launched[f"dropout-reference-{model}"][0])
    # Lightning reports each accumulated micro-batch's loss divided by 4: the step's loss is their sum
    ref["losses"] = [sum(ref["losses"][i:i + 4]) for i in range(0, 4 * DROPOUT_STEPS, 4)]
    no_dropout = run_reference(model, steps=DROPOUT_STEPS)
    change = max(float((v - no_dropout["params"][k]).abs().max()) for k, v in ref["params"].items())
    assert change > 20 * ATOL  # dropout is really on: the comparison below is not vacuous
    for i in range(len(runs)):
        assert_matches(launched[f"dropout-{model}-{pp}-{i}"], ref)


@pytest.mark.multiprocess
def test_eval_predict_logging_and_callbacks_pp2(launched):
    """Forward-only pipeline for validate/predict; what the last stage logs reaches every rank, so
    ModelCheckpoint (monitoring a logged metric), EarlyStopping and the progress bar work on all of them."""
    ranks = launched["eval_predict"]
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
def test_two_stages_per_rank_equal_one_process(launched, schedule):
    """Interleaved 1F1B and ZB-V place two stages on each rank (pp=2: four stages). GPT-2 with wte/lm_head tied
    (across ranks when interleaved, on one rank in the V), recompute and global-norm clipping, and Llama: equal
    to one process; validate and predict pass through all four stages."""
    ranks = launched[f"two_stages-{schedule}"]
    assert_matches(ranks, run_reference("gpt2_tied", clip=0.5, module={"n": 16}))
    output = launched.output(f"two_stages-{schedule}")
    assert "into 4 stages (pipeline rank of each stage:" in output
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
        assert_matches(launched["two_stages-llama"], run_reference("llama"))


@pytest.mark.multiprocess
def test_two_stages_per_rank_checkpoint_consolidates_in_model_order(launched, tmp_path):
    """Interleaved: rank 0 holds stages 0 and 2, rank 1 stages 1 and 3. The consolidated checkpoint lists the
    optimizer state in one process's parameter order (stage 0, 1, 2, 3), so a plain Lightning resume pairs
    each momentum buffer with its own weight (identical blocks would otherwise swap silently)."""
    from lightning_merak import cli

    launched["interleaved_checkpoint"]
    merged = tmp_path / "merged.ckpt"
    assert cli.main(["consolidate", str(launched.folder("evaluation") / "ckpt" / "last.ckpt"), str(merged)]) == 0
    plain = torch.load(merged, weights_only=False)
    assert plain["merak_param_order"] == [n for n, _ in make_module("gpt2").named_parameters()]
    assert len(plain["optimizer_states"][0]["state"]) == len(plain["merak_param_order"])


@pytest.mark.multiprocess
def test_checkpoint_and_early_stopping_pp2(launched):
    ranks = launched["early_stopping"]
    # EarlyStopping with a huge min_delta stops after the second validation, on both ranks alike
    assert [r["stopped_epoch"] for r in ranks] == [1, 1]
    assert ranks[0]["best_model_path"] == ranks[1]["best_model_path"]
    assert (launched.folder("features") / "ckpt" / "last.ckpt" / "meta.pt").is_file()


@pytest.mark.multiprocess
def test_variable_sequence_length(launched):
    assert_matches(launched["variable_length"], run_reference("gpt2", steps=4, module={"variable_length": True}))


@pytest.mark.multiprocess
def test_dp2_pp2_equals_one_process(launched):
    ranks = launched["dp2_pp2"]
    ref = run_reference("llama", dp=2)
    # each replica's loss is its half of the global batch: compare the mean over replicas
    losses = torch.tensor([r["losses"] for r in ranks]).view(2, 2, -1)[:, -1].mean(0)
    torch.testing.assert_close(losses, torch.tensor(ref["losses"]), atol=ATOL, rtol=0)
    for rank in ranks:
        for key, value in rank["params"].items():
            torch.testing.assert_close(value, ref["params"][key], atol=ATOL, rtol=0, msg=key)


@pytest.mark.multiprocess
def test_memory_budget_counts_the_users_optimizer(launched):
    """With a memory budget the cut is planned before the optimizer exists: the strategy measures the one
    ``configure_optimizers`` makes (SGD with momentum: one weight-sized state) and the plan counts it per stage;
    the run still equals one process."""
    assert_matches(launched["budget"], run_reference("gpt2_tied", module={"momentum": 0.9}))
    output = launched.output("budget")
    assert "Merak memory_budget: SGD keeps 1 weight-sized state tensor(s) per parameter on each rank" in output
    assert "memory_budget 953.7 MiB per device; per stage static + activation reserve" in output, output[-3000:]


def test_tied_embeddings_across_stages_and_global_norm_clipping(launched):
    """GPT-2 with wte/lm_head tied: the two stages' copies get their gradients summed, so both stay equal to the
    one tied weight of one process; clipping by the global norm over the stages counts that weight once."""
    assert_matches(launched["tied"], run_reference("gpt2_tied", clip=0.5))
    assert_matches(launched["clipped"], run_reference("sequential", clip=0.05))


@pytest.mark.multiprocess
def test_auto_schedule_and_real_timeline(launched):
    """The default "auto": planned on 4- and 2-stage cuts before step 1, a two-stage-per-rank schedule wins the
    simulation for this GPT-2 (recompute 0.5 on every candidate), the model is cut into 4 stages for it, the
    choice is made again from step 1's measured times within that placement, and the run equals one process."""
    ranks = launched["auto"]
    # the schedules are rebuilt after the re-choice (recompute re-applied): the run still equals one process
    assert_matches(ranks, run_reference("gpt2", steps=4))
    output = launched.output("auto")
    chosen = re.search(r"pipeline_schedule='auto' chose (\S+) \(2 stage\(s\) per rank\).*runner-up (\S+)", output)
    assert chosen and chosen[1] in ("interleaved_1f1b", "zbv"), output[-3000:]
    assert "into 4 stages (pipeline rank of each stage:" in output
    assert re.search(r"re-chosen from the times measured in step 1: (interleaved_1f1b|zbv)", output)
    simulated = re.search(r"Merak (\S+): simulated step from the stage times measured in step 1: ([0-9.e+-]+) s",
                          output)
    assert simulated and simulated[1] in ("interleaved_1f1b", "zbv") and float(simulated[2]) > 0
    assert "recomputes stage 0 4/4 forwards (50% of its forward FLOPs)" in output

    events = json.loads((launched.folder("features") / "trace" / "pipeline_step0.json").read_text())["traceEvents"]
    actions = [e["name"] for e in events if e.get("ph") == "X"]
    # every rank's forwards and (input-)backwards of 4 stages x 4 micro-batches, gathered to rank 0
    assert {e["tid"] for e in events if e.get("ph") == "X"} == {0, 1}
    assert sum(1 for a in actions if "F" in a) == 16 and sum(1 for a in actions if "B" in a or "I" in a) == 16
