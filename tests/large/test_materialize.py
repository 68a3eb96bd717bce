"""Large models: built on meta, only this rank's part materialised, each module's own init (issue 11)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lightning_merak._compat import strip_module_state
from lightning_merak.materialize import MaterializationError, materialize
from tests.helpers.pipeline_models import build_hf
from tests.pipeline.test_pipeline_training import assert_matches, run_merak, run_reference


def _meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return build_hf(name)


def test_meta_gpt2_gets_its_own_init_once_per_tie_and_the_same_values_for_the_same_seed():
    a, b = _meta("gpt2_tied"), _meta("gpt2_tied")
    done = materialize(a, torch.device("cpu"), seed=3)
    materialize(b, torch.device("cpu"), seed=3)
    assert done.initialized_bytes == sum(p.numel() * 4 for p in a.parameters()) + sum(
        t.numel() * t.element_size() for t in a.buffers())
    assert a.lm_head.weight is a.transformer.wte.weight  # the tie survives: one tensor, initialised once
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert not p.is_meta and torch.isfinite(p).all(), name
        assert torch.equal(p, q), name  # same seed, same values: every copy on every rank agrees
    assert float(a.transformer.h[0].attn.c_attn.weight.detach().std()) == pytest.approx(0.02, rel=0.2)  # HF's init, not NaN
    assert torch.equal(a.transformer.ln_f.weight, torch.ones(32))
    c = _meta("gpt2_tied")
    materialize(c, torch.device("cpu"), seed=4)
    assert not torch.equal(c.transformer.wte.weight, a.transformer.wte.weight)


def test_meta_llama_rotary_tables_equal_the_eager_ones():
    eager, meta = build_hf("llama"), _meta("llama")
    materialize(meta, torch.device("cpu"), seed=0)
    for (name, t), (_, u) in zip(eager.named_buffers(), meta.named_buffers(), strict=True):
        assert torch.equal(t, u), name  # buffers computed in __init__ are recomputed by the model's init


def test_a_parameter_no_init_covers_is_an_error_naming_the_module():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4))

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), Scale())
    with pytest.raises(MaterializationError, match=r"`1` \(Scale\) .* `gain` got no values: it has no reset_parameters"):
        materialize(model, torch.device("cpu"), seed=0)


def test_real_tensors_are_moved_not_reinitialised():
    model = nn.Linear(4, 4)
    before = model.weight.detach().clone()
    done = materialize(model, torch.device("cpu"), seed=0)
    assert done.initialized_bytes == 0 and torch.equal(model.weight, before)


@pytest.mark.multiprocess
@pytest.mark.parametrize("model, devices, strategy", [
    ("gpt2_tied", 2, {"pipeline_parallel_size": 2}),
    ("llama", 4, {"pipeline_parallel_size": 2, "tensor_parallel_size": 2}),
])
def test_configure_model_on_meta_materialises_only_the_local_part(tmp_path, model, devices, strategy):
    """The model is made in configure_model (pp=2, and pp=2 x tp=2 for Llama): no rank holds all of it, the
    losses equal one process building the same way (the same seeded init), and the first loss is within 2 % of
    an eagerly initialised one-process run."""
    strategy = {"pipeline_schedule": "1f1b", "recompute": "none", **strategy}
    module = {"build": "configure_model"}
    ranks = run_merak(tmp_path / "pp", model, devices, strategy, module=module)
    one = run_merak(tmp_path / "one", model, 1, {}, module=module)[0]
    assert one["meta_tensors"] == 0 and all(r["meta_tensors"] == 0 for r in ranks)
    full = one["local_param_bytes"]
    names = set(one["local_param_names"])
    held = set().union(*(r["local_param_names"] for r in ranks))
    assert names <= held and held - names <= {"model.lm_head.weight"}  # nothing lost (a tie is listed once in one)
    for r in ranks:
        assert r["local_param_bytes"] <= 0.75 * full, (r["local_param_bytes"], full)  # never the whole model
    if devices == 2:  # two stages: only the tied embedding is on both
        shared = set(ranks[0]["local_param_names"]) & set(ranks[1]["local_param_names"])
        assert shared <= {"model.transformer.wte.weight", "model.lm_head.weight"}, shared
    assert_matches(ranks, {"losses": one["losses"], "params": one["params"]})
    eager = run_reference(model)
    assert one["losses"][0] == pytest.approx(eager["losses"][0], rel=0.02)


@pytest.mark.multiprocess
def test_init_module_empty_init_builds_on_meta(tmp_path):
    ranks = run_merak(tmp_path, "gpt2", 2, {"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b"}, steps=2)
    meta = run_merak(tmp_path / "meta", "gpt2", 2, {"pipeline_parallel_size": 2, "pipeline_schedule": "1f1b"},
                     steps=2, init_module=True)
    assert all(r["meta_tensors"] == 0 for r in meta)
    assert meta[0]["losses"][0] == pytest.approx(ranks[0]["losses"][0], rel=0.02)


def _save(folder, sharded: bool) -> nn.Module:
    model = build_hf("gpt2_tied")
    model.save_pretrained(folder, max_shard_size="40KB" if sharded else "5GB")
    return model


@pytest.mark.parametrize("sharded", [False, True])
def test_from_pretrained_under_the_strategy_reads_lazily_and_exactly(tmp_path, sharded):
    from transformers import GPT2LMHeadModel

    from lightning_merak.pretrained import lazy_from_pretrained

    saved = _save(tmp_path, sharded)
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    with torch.device("meta"), lazy_from_pretrained():
        model = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert all(p.is_meta for p in model.parameters())
    stage = copy.deepcopy(model)  # the first of two stages: blocks 2 and 3 are another rank's
    for block in stage.transformer.h[2:]:
        strip_module_state(block)
    done = materialize(stage, torch.device("cpu"), seed=0)
    local = {n for n, _ in stage.named_parameters()}
    assert not any(".h.2." in n or ".h.3." in n for n in done.read_keys)
    assert set(done.read_keys) == local  # read exactly what this stage holds (the tied head is wte)
    materialize(model, torch.device("cpu"), seed=0)
    for (name, p), q in zip(model.named_parameters(), saved.parameters(), strict=True):
        assert torch.equal(p, q), name
        if name in local:
            assert torch.equal(stage.get_parameter(name), q), name
    assert model.lm_head.weight is model.transformer.wte.weight


def test_from_pretrained_refuses_a_folder_that_is_not_local_and_a_mismatched_one(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_merak.pretrained import PretrainedFolderError, lazy_from_pretrained

    with torch.device("meta"), lazy_from_pretrained(), pytest.raises(PretrainedFolderError, match="not a local folder"):
        GPT2LMHeadModel.from_pretrained("openai-community/gpt2")
    _save(tmp_path, sharded=False)
    bigger = GPT2Config.from_pretrained(tmp_path)
    bigger.n_embd = 64
    with torch.device("meta"), lazy_from_pretrained():
        model = GPT2LMHeadModel.from_pretrained(tmp_path, config=bigger)
    with pytest.raises(PretrainedFolderError, match=r"`transformer\.[a-z0-9.]+` has shape \[\d+(, \d+)*\] in"):
        materialize(model, torch.device("cpu"), seed=0)


@pytest.mark.multiprocess
def test_from_pretrained_in_configure_model_reads_each_ranks_tensors_only(tmp_path):
    """A sharded safetensors folder loaded in configure_model at pp=2, pp=4 and pp=2 x tp=2 equals one process
    that loaded it whole; each rank reads only its own tensors."""
    import re

    saved = _save(tmp_path / "ckpt", sharded=True)
    keys = len(saved.state_dict()) - 1  # the tied head is stored once
    module = {"build": "configure_model", "pretrained": str(tmp_path / "ckpt")}
    ref = run_reference("gpt2_tied", module=module)
    for devices, strategy in ((2, {"pipeline_parallel_size": 2}), (4, {"pipeline_parallel_size": 4}),
                              (4, {"pipeline_parallel_size": 2, "tensor_parallel_size": 2})):
        out = tmp_path / f"run{devices}_{len(strategy)}"
        ranks = run_merak(out, "gpt2_tied", devices, {"pipeline_schedule": "1f1b", "recompute": "none", **strategy},
                          module=module)
        assert_matches(ranks, ref)
        reads = json.loads(re.search(r"read from the pretrained folder per rank: (\[[\d, ]+\])",
                                     (out / "output.txt").read_text()).group(1))
        pp = strategy["pipeline_parallel_size"]
        assert sum(reads[: pp * strategy.get("tensor_parallel_size", 1): strategy.get("tensor_parallel_size", 1)]) \
            == keys, reads  # one pipeline's ranks together read every tensor once
        assert max(reads) < keys, reads


def test_a_checkpoint_of_another_model_names_the_first_mismatch(tmp_path):
    from lightning_merak import checkpoint as ckpt

    small = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    ckpt.save_sharded(tmp_path / "c", {"epoch": 0}, small, [], is_rank_zero=True)
    wider = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 2))
    with pytest.raises(ckpt.CheckpointError, match=r"tensor `0.weight` has shape \[8, 4\] in the checkpoint but "
                                                    r"\[16, 4\] in this module"):
        ckpt.load(tmp_path / "c", wider, [])
    deeper = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(2, 2))
    with pytest.raises(ckpt.CheckpointError, match="has no tensor `2.weight`"):
        ckpt.load(tmp_path / "c", deeper, [])


def test_configure_model_on_a_real_device_is_refused():
    import lightning.pytorch as pl

    from lightning_merak import MerakConfigError, MerakStrategy

    class Module(pl.LightningModule):
        def configure_model(self):
            self.head = nn.Linear(2, 2, device="cpu")  # explicit device: the strategy cannot cut it first

    strategy = MerakStrategy()
    strategy._lightning_module = module = Module()
    with pytest.raises(MerakConfigError, match=r"configure_model\(\) created `head.weight` on cpu.*meta device"):
        with strategy.tensor_init_context():
            module.configure_model()
    with strategy.tensor_init_context():  # without device=, the module lands on meta, as planned
        module.head = nn.Linear(2, 2)
    assert module.head.weight.is_meta


def test_init_module_builds_on_meta_only_when_asked():
    """``trainer.init_module()`` keeps real weights a user may load before fit; ``empty_init=True`` means meta."""
    from lightning_merak import MerakStrategy

    strategy = MerakStrategy()
    with strategy.tensor_init_context():
        plain = nn.Linear(2, 2)
    with strategy.tensor_init_context(empty_init=True):
        empty = nn.Linear(2, 2)
    assert plain.weight.device.type == "cpu" and empty.weight.is_meta
