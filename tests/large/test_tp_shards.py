"""Tensor-parallel shards materialised on their own: sharded on meta, each rank gives memory (and the one-process
values) to its slice only, never to a whole sharded weight (issue 11)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lightning_merak.tensor_parallel.shards import STREAM_CHUNK, ShardIndex, _Target
from tests.helpers.launch import spawn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape, dim, runs", [
    ((3 * STREAM_CHUNK // 64 + 3, 64), 0, ((5, 101),)),  # rows: one contiguous run of the flat stream
    ((300, 2 * STREAM_CHUNK // 256 + 7), 1, ((0, 40), (90, 130))),  # columns, strided (fused q|k|v) runs
    ((5, 3), 1, ((1, 2),)),  # fewer than 16 elements: torch's other normal_ path
])
def test_a_shard_draws_exactly_its_elements_of_the_one_process_random_stream(dtype, shape, dim, runs):
    index = ShardIndex(shape, dim, runs)
    for fill in (lambda t: t.normal_(0.1, 0.02), lambda t: t.uniform_(-0.5, 0.5)):
        torch.manual_seed(3)
        whole = torch.empty(shape, dtype=dtype)
        fill(whole)
        after_whole = torch.rand(4)
        torch.manual_seed(3)
        local = torch.empty(index.take(whole).shape, dtype=dtype)
        _Target(torch.empty(shape, dtype=dtype, device="meta"), local, index).draw(
            lambda t, *a, fill=fill, **k: fill(t), (), {})
        assert torch.equal(local, index.take(whole))
        assert torch.equal(torch.rand(4), after_whole)  # the generator ends where one process's does


def _shards_equal_one_process(rank: int, world: int, width: int, vocab: int) -> dict:
    """Each rank: GPT-2, Llama and a model with a non-elementwise init built on meta, sharded over tp=2 on meta,
    then materialised; every local shard is compared with the same slice of one process's materialisation (same
    seed). Returns what the rank allocated."""
    import transformers as tf
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch.profiler import ProfilerActivity, profile

    from lightning_merak._compat import local_shard
    from lightning_merak.materialize import materialize
    from lightning_merak.tensor_parallel import apply_tensor_parallel, tp_plan_for

    mesh = init_device_mesh("cpu", (world,))
    configs = {
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=width, n_head=8, n_positions=16,
                                                         vocab_size=vocab)),
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=2, hidden_size=width,
                                                            intermediate_size=2 * width, num_attention_heads=8,
                                                            num_key_value_heads=4, max_position_embeddings=16,
                                                            vocab_size=vocab, tie_word_embeddings=False)),
    }
    class Orthogonal(torch.nn.Linear):  # an init that is not elementwise: the whole weight, one at a time
        def reset_parameters(self) -> None:
            torch.nn.init.orthogonal_(self.weight)
            torch.nn.init.zeros_(self.bias)

    configs["orthogonal"] = lambda: torch.nn.Sequential(Orthogonal(width, 2 * width), torch.nn.ReLU(),
                                                        Orthogonal(2 * width, width))
    out = {}
    for name, build in configs.items():
        with torch.device("meta"):
            one, model = build(), build()
        materialize(one, torch.device("cpu"), seed=11)
        if name == "orthogonal":
            parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        else:
            ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
            apply_tensor_parallel(model, mesh, tp_plan_for(model, world, {"input_ids": ids}), subtensor_chunks=1)
        sharded = {n: p for n, p in model.named_parameters() if isinstance(p, DTensor) and p.to_local().shape != p.shape}
        assert sharded, name
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            done = materialize(model, torch.device("cpu"), seed=11)
        temporaries = _temporaries(prof, model)
        for (n, p), q in zip(model.named_parameters(), one.parameters(), strict=True):
            expected = distribute_tensor(q.detach(), mesh, p.placements, src_data_rank=None).to_local() \
                if isinstance(p, DTensor) else q
            assert torch.equal(local_shard(p), expected), (name, n)
        for (n, b), c in zip(model.named_buffers(), one.buffers(), strict=True):
            assert torch.equal(b, c), (name, n)
        out[name] = {"largest_temporary": max(temporaries, default=0),
                     "whole_bytes": done.whole_bytes,
                     "smallest_sharded_whole": min(p.numel() * p.element_size() for p in sharded.values() if p.dim() > 1),
                     "initialized_bytes": done.initialized_bytes,
                     "full_bytes": sum(q.numel() * q.element_size() for q in [*one.parameters(), *one.buffers()])}
    return out


@pytest.mark.multiprocess
def test_tp_shards_get_the_one_process_values_and_no_rank_makes_a_whole_sharded_weight():
    width, vocab = 512, 1024  # a sharded weight is many chunks of a random stream
    ranks = spawn(_shards_equal_one_process, 2, width, vocab, timeout=300)
    for r in ranks:
        orthogonal = r.pop("orthogonal")  # equal to one process too, through one whole weight at a time
        assert orthogonal["whole_bytes"] == (width * 2 * width + 2 * width) * 4, orthogonal  # one layer's, whole
        for model in r.values():
            assert model["whole_bytes"] == 0, model  # elementwise inits: every shard initialised directly
            # no temporary as large as a whole sharded weight (the chunks of the random streams are bounded)
            assert model["largest_temporary"] <= 4 * (STREAM_CHUNK + 15) < model["smallest_sharded_whole"], model
            # about half the weights per rank (norms, biases of row-parallel layers replicated)
            assert model["initialized_bytes"] < 0.53 * model["full_bytes"], model


def _temporaries(prof, module: torch.nn.Module) -> Counter:
    """Sizes of the allocations torch made under ``prof``, less one per tensor ``module`` holds now."""
    from lightning_merak._compat import local_shard

    sizes = Counter(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    for t in {id(t): t for t in [*module.parameters(), *module.buffers()]}.values():
        sizes[local_shard(t).numel() * t.element_size()] -= 1
    assert all(count >= 0 for count in sizes.values()), sizes
    return +sizes


def _build_pp2_tp2(rank: int, world: int, width: int, vocab: int) -> dict:
    """The build recipe (``build_engine``) for a GPT-2 made in ``configure_model`` at pp=2 x tp=2: what each rank
    holds afterwards, and the largest temporary allocated while building."""
    import lightning.pytorch as pl
    import transformers as tf
    from torch.distributed.tensor import DTensor
    from torch.profiler import ProfilerActivity, profile

    from lightning_merak import topology
    from lightning_merak._compat import local_shard
    from lightning_merak.config import MerakConfig
    from lightning_merak.parallelize import build_engine

    config = tf.GPT2Config(n_layer=4, n_embd=width, n_head=8, n_positions=16, vocab_size=vocab)

    class GPT(pl.LightningModule):
        def configure_model(self) -> None:
            self.model = tf.GPT2LMHeadModel(config)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

    module = GPT()
    with torch.device("meta"):  # as MerakStrategy.tensor_init_context does around configure_model
        module.configure_model()
    full = sum(p.numel() * p.element_size() for p in module.parameters())
    mesh = topology.build_mesh("cpu", 1, 2, 2)
    batch = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(0))
    options = MerakConfig(pipeline_parallel_size=2, tensor_parallel_size=2, pipeline_schedule="1f1b",
                          recompute="none", num_microbatches=2)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        build_engine(module, batch, "training_step", options, mesh, torch.device("cpu"))
    sharded = [p for p in module.parameters() if isinstance(p, DTensor) and p.to_local().shape != p.shape]
    return {"full": full, "held": sum(local_shard(t).numel() * t.element_size()
                                      for t in {id(t): t for t in [*module.parameters(), *module.buffers()]}.values()),
            "largest_temporary": max(_temporaries(prof, module), default=0),
            "smallest_sharded_whole": min(p.numel() * p.element_size() for p in sharded if p.dim() > 1)}


@pytest.mark.multiprocess
def test_pp2_tp2_build_materialises_a_quarter_per_rank_and_no_whole_sharded_weight():
    """Bytes, not times: each of the four ranks holds about a quarter of the model (its stage's TP shards, plus the
    replicated norms and biases and its shard of the tied embedding), and nothing the recipe allocates on the way
    is as large as a whole sharded weight."""
    ranks = spawn(_build_pp2_tp2, 4, 256, 1024, timeout=300)
    for r in ranks:
        assert 0.22 * r["full"] < r["held"] < 0.3 * r["full"], r
        assert r["largest_temporary"] < r["smallest_sharded_whole"], r
