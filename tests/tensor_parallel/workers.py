"""Per-rank bodies of the tensor-parallel tests (importable by spawned processes)."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from lightning_merak.tensor_parallel import apply_tensor_parallel, tp_plan_for
from tests.tensor_parallel.models import batch, build, logits_and_loss

STEPS = 3


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _train(name: str, model: torch.nn.Module, optimizer: str) -> dict:
    """Forward/backward of batch 0 (logits, loss, grads), then ``STEPS`` optimizer steps (final params)."""
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-3))
    out = {}
    for step in range(STEPS):
        logits, loss = logits_and_loss(name, model, batch(name, seed=step))
        loss.backward()
        if step == 0:
            out["logits"], out["loss"] = logits.detach(), loss.detach()
            out["grads"] = {n: _full(p.grad) for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    out["params"] = {n: _full(p.detach()) for n, p in model.named_parameters()}
    return out


def compare_models(rank: int, world: int, names: list[str], chunk_list: list[int]) -> dict:
    """tp=world vs one process: max |difference| of logits, loss, grads, params, per model and chunk count.

    ``names``: model names, optionally ``name:adamw`` (default SGD with momentum).
    """
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    result = {}
    for entry in names:
        name, _, optimizer = entry.partition(":")
        optimizer = optimizer or "sgd"
        ref = _train(name, build(name), optimizer)
        plain_logits = None
        for k in chunk_list:
            model = build(name)
            plan = tp_plan_for(model, world)
            apply_tensor_parallel(model, mesh["tp"], plan, subtensor_chunks=k)
            got = _train(name, model, optimizer)
            plain_logits = got["logits"] if plain_logits is None else plain_logits
            result[(entry, k)] = {
                "logits": float((got["logits"] - ref["logits"]).abs().max()),
                "loss": abs(float(got["loss"] - ref["loss"])),
                "grads": _max_diff(got["grads"], ref["grads"]),
                "params": _max_diff(got["params"], ref["params"]),
                "moved": _max_diff(got["params"], {n: p.detach() for n, p in build(name).named_parameters()}),
                "vs_first_chunking": float((got["logits"] - plain_logits).abs().max()),
                "dtensors": sum(isinstance(p, DTensor) for p in model.parameters()),
            }
    return result


def clip_norms(rank: int, world: int) -> dict:
    """``clip_grad_norm_`` on a tp model vs torch's on the one-process model; a pipeline-like group too."""
    import torch.distributed as dist

    from lightning_merak.tensor_parallel import clip_grad_norm_

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    ref, model = build("gpt2"), build("gpt2")
    apply_tensor_parallel(model, mesh["tp"], tp_plan_for(model, world), subtensor_chunks=2)
    for m in (ref, model):
        logits_and_loss("gpt2", m, batch("gpt2"))[1].backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm=0.5)
    norm = clip_grad_norm_(list(model.parameters()), max_norm=0.5, groups=[mesh["tp"].get_group()])
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    clipped = _max_diff({n: _full(p.grad) for n, p in model.named_parameters()}, ref_grads)
    # pipeline-like: each rank holds a different plain parameter, its norm summed over the group
    own = torch.nn.Parameter(torch.zeros(3))
    own.grad = torch.full((3,), float(rank + 1))
    pp_norm = clip_grad_norm_([own], max_norm=100.0, groups=[dist.group.WORLD])
    return {"norm": float(norm), "ref_norm": float(ref_norm), "clipped_grads": clipped, "pp_norm": float(pp_norm)}


def stubs_and_warning(rank: int, world: int) -> dict:
    """A plan made on the whole model, applied after a pipeline cut replaced blocks by stubs; the node warning."""
    import os
    import warnings

    class Stub(torch.nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    model = build("llama")
    plan = tp_plan_for(model, world)
    model.model.layers[1] = Stub()
    del model.lm_head
    os.environ["LOCAL_WORLD_SIZE"] = "1"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_tensor_parallel(model, mesh["tp"], plan, subtensor_chunks=2)
    del os.environ["LOCAL_WORLD_SIZE"]
    hidden = model.model(input_ids=batch("llama")["input_ids"]).last_hidden_state
    ref = build("llama")
    ref.model.layers[1] = Stub()
    ref_hidden = ref.model(input_ids=batch("llama")["input_ids"]).last_hidden_state
    return {"warnings": [str(w.message) for w in caught], "hidden": float((hidden - ref_hidden).abs().max()),
            "sharded": [n for n, p in model.named_parameters() if isinstance(p, DTensor)]}


def checkpoint_round_trip(rank: int, world: int, name: str, path: str, one_process_path: str) -> dict:
    """DCP save of a tp model (``get_model_state_dict``, original names); load a one-process checkpoint back."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    model = build(name, seed=1)
    apply_tensor_parallel(model, mesh["tp"], tp_plan_for(model, world), subtensor_chunks=2)
    dcp.save(get_model_state_dict(model), checkpoint_id=path)
    dist_barrier()
    other = build(name, seed=2)
    apply_tensor_parallel(other, mesh["tp"], tp_plan_for(other, world), subtensor_chunks=2)
    state = get_model_state_dict(other)
    dcp.load(state, checkpoint_id=one_process_path)
    set_model_state_dict(other, state)
    expected = build(name, seed=3)
    return _max_diff({n: _full(p.detach()) for n, p in other.named_parameters()},
                     {n: p.detach() for n, p in expected.named_parameters()})


def dist_barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def optimizer_checkpoint(rank: int, world: int, path: str) -> float:
    """GPT-2 (strided c_attn) + SGD momentum at tp=2: DCP save of model and optimizer; reload into a fresh tp copy."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from lightning_merak.tensor_parallel import make_optimizer_checkpointable

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))

    def trained(steps: int):
        model = build("gpt2")
        apply_tensor_parallel(model, mesh["tp"], tp_plan_for(model, world), subtensor_chunks=2)
        opt = make_optimizer_checkpointable(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        for step in range(steps):
            logits_and_loss("gpt2", model, batch("gpt2", seed=step))[1].backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    model, opt = trained(2)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    other, other_opt = trained(1)
    msd, osd = get_state_dict(other, other_opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(other, other_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    want = {n: _full(opt.state[p]["momentum_buffer"]) for n, p in model.named_parameters()}
    got = {n: _full(other_opt.state[p]["momentum_buffer"]) for n, p in other.named_parameters()}
    params = _max_diff({n: _full(p.detach()) for n, p in other.named_parameters()},
                       {n: _full(p.detach()) for n, p in model.named_parameters()})
    return max(_max_diff(got, want), params)


def batch_of_one(rank: int, world: int) -> dict:
    """A micro-batch of one sample (pipelines): sub-tensor chunks split the sequence instead; same numbers."""
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    out = {}
    for name in ("gpt2", "demo"):
        inputs = {k: v[:1] for k, v in batch(name).items()}
        ref, model = build(name), build(name)
        apply_tensor_parallel(model, mesh["tp"], tp_plan_for(model, world), subtensor_chunks=4)
        results = []
        for m in (ref, model):
            logits, loss = logits_and_loss(name, m, inputs)
            loss.backward()
            results.append((logits.detach(), {n: _full(p.grad) for n, p in m.named_parameters()}))
        out[name] = max(float((results[0][0] - results[1][0]).abs().max()), _max_diff(results[1][1], results[0][1]))
    return out


def all_checks(rank: int, world: int, folder: str) -> dict:
    """Every check above in one launch (spawn start-up of torch and transformers costs more than the checks);
    the tests read their own entry. ``folder`` holds the one-process DCP checkpoint ``one`` (demo, seed 3)."""
    return {
        "gpt2+llama": compare_models(rank, world, ["gpt2", "llama"], [1, 2, 4]),
        "bert+vit": compare_models(rank, world, ["bert", "vit"], [1, 2, 4]),
        "demo+llama:adamw": compare_models(rank, world, ["demo", "llama:adamw"], [1, 2, 4]),
        "clip_norms": clip_norms(rank, world),
        "stubs_and_warning": stubs_and_warning(rank, world),
        "checkpoint_round_trip": checkpoint_round_trip(rank, world, "demo", f"{folder}/tp2", f"{folder}/one"),
        "optimizer_checkpoint": optimizer_checkpoint(rank, world, f"{folder}/optimizer"),
        "batch_of_one": batch_of_one(rank, world),
    }
