"""Per-rank bodies of the support matrix: each family at pp = 2 and at tp = 2 against one process, in one launch.

Pipeline: the library's own pieces as the strategy composes them (``plan_model`` on a micro-batch,
``build_stage``, torch's ``PipelineStage`` with the boundary metas, the 1F1B schedule over 2 micro-batches, or
GPipe over the whole batch as 1 micro-batch: the exact loss where the loss couples the batch, as the MoE
auxiliary loss does), then a forward-only pass of the whole batch with plain ``dist.send`` (the evaluation
path). Reference: one process accumulating the same micro-batches. Tensor parallel: ``tp_plan_for`` + ``apply_tensor_parallel``,
one forward/backward of the whole batch. A family that is refused returns the error's message instead.
"""

from __future__ import annotations

import copy
import traceback
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from tests.breadth.families import build

MICRO = 2


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every name of every parameter (tied weights under each of their names) → its full gradient."""
    return {n: _full(p.grad) for n, p in model.named_parameters(remove_duplicate=False) if p.grad is not None}


def _sum_tied(model: nn.Module, plan) -> None:
    """A weight tied across the two stages gets part of its gradient on each: sum them, as the engine does."""
    names = dict(model.named_parameters(remove_duplicate=False))
    for tie in plan.tied:
        local = {id(names[n]): names[n] for n in tie.names if n in names}
        for p in local.values():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)
            p.grad = grad


def _max_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    missing = set(got) - set(want)
    assert not missing, f"gradients the reference lacks: {sorted(missing)}"
    return max([float((g - want[k]).abs().max()) for k, g in got.items()], default=0.0)


def _micro(batch: dict, micro: int = MICRO) -> list[dict]:
    return [{k: v.chunk(micro)[i] for k, v in batch.items()} for i in range(micro)]


class _Runner(nn.Module):
    """What ``PipelineStage`` runs: micro-batch ``mb``'s stage forward; on the last stage the loss the step reads."""

    def __init__(self, stage: nn.Module, inputs: list[dict], is_last: bool) -> None:
        super().__init__()
        self.stage, self.inputs, self.is_last = stage, inputs, is_last

    def forward(self, *received: torch.Tensor, mb: torch.Tensor):
        out = self.stage(*received, model_args=(), model_kwargs=self.inputs[int(mb.reshape(-1)[0])])
        return out.loss / len(self.inputs) if self.is_last else out


def _example(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta").requires_grad_(t.is_floating_point())


def pipeline_case(rank: int, name: str, micro_batches: int = MICRO, config: dict | None = None) -> dict:
    """``config``: attributes set on the model's config first (``output_router_logits=False``: no aux loss)."""
    from torch.distributed.pipelining import PipelineStage

    from lightning_merak.partition import plan_model
    from lightning_merak.pipeline.runtime import build_schedule
    from lightning_merak.pipeline.stage import build_stage

    model, batch = build(name)
    for key, value in (config or {}).items():
        setattr(model.config, key, value)
    reference = copy.deepcopy(model)
    micro = _micro(batch, micro_batches)
    ref_loss = 0.0
    for mb in micro:
        loss = reference(**mb).loss / micro_batches
        loss.backward()
        ref_loss += float(loss.detach())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_model(model, ((), micro[0]), 2)
    stage = build_stage(model, plan, rank)
    recv, send = stage.boundary_metas((), micro[0])
    last = rank == 1
    pipe = PipelineStage(_Runner(stage, micro, last), rank, 2, torch.device("cpu"),
                         input_args=tuple(_example(t) for t in recv), output_args=tuple(_example(t) for t in send))
    schedule = build_schedule("1f1b" if micro_batches > 1 else "gpipe", pipe, micro_batches,
                              loss_fn=lambda out, target: out)
    index = torch.arange(micro_batches)
    losses: list[torch.Tensor] = []
    if last:
        schedule.step(mb=index, target=index, losses=losses, return_outputs=False)
    else:
        schedule.step(mb=index)
    _sum_tied(model, plan)
    result = {"balance": plan.balance, "warnings": [str(w.message) for w in caught if "balance" in str(w.message)],
              "carried": [b.via for b in plan.stages[0].boundary if b.via != "argument"]}
    if last:
        result["loss"] = abs(sum(float(v) for v in losses) - ref_loss)
    # evaluation: the whole batch, forward only, boundary tensors sent exactly as the stage returns them
    with torch.no_grad():
        want = float(reference(**batch).loss)
        if rank == 0:
            for t in stage(model_args=(), model_kwargs=batch):
                dist.send(t, dst=1)
        else:
            recv, _ = stage.boundary_metas((), batch)
            buffers = []
            for meta in recv:
                buffers.append(torch.empty(meta.shape, dtype=meta.dtype))
                dist.recv(buffers[-1], src=0)
            result["eval"] = abs(float(stage(*buffers, model_args=(), model_kwargs=batch).loss) - want)
    result["grads"] = _max_diff(_grads(model), _grads(reference))  # after the last transfer: may raise
    return result


def tensor_parallel_case(rank: int, name: str, mesh) -> dict:
    from lightning_merak.tensor_parallel import apply_tensor_parallel, tp_plan_for

    model, batch = build(name)
    reference = copy.deepcopy(model)
    ref_loss = reference(**batch).loss
    ref_loss.backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = tp_plan_for(model, 2, example_inputs=((), batch))
    apply_tensor_parallel(model, mesh, plan, subtensor_chunks=2)
    loss = model(**batch).loss
    loss.backward()
    sharded = sum(isinstance(p, DTensor) for p in model.parameters())
    return {"loss": abs(float(loss - ref_loss)), "grads": _max_diff(_grads(model), _grads(reference)),
            "sharded": sharded, "source": plan.source, "warnings": [str(w.message) for w in caught]}


#: pipeline variants beyond plain "pp": (micro-batches, config overrides)
PIPELINE_MODES = {"pp": (MICRO, None), "pp_whole_batch": (1, None),
                  "pp_aux_off": (MICRO, {"output_router_logits": False})}


def matrix(rank: int, world: int, cases: list[tuple[str, str]]) -> dict:
    """``cases``: (family, "tp" or a ``PIPELINE_MODES`` key); returns {(family, mode): result dict or
    {"refused": message}}."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))["tp"]
    results = {}
    for name, mode in cases:
        try:
            results[(name, mode)] = (pipeline_case(rank, name, *PIPELINE_MODES[mode]) if mode in PIPELINE_MODES
                                     else tensor_parallel_case(rank, name, mesh))
        except (ValueError, NotImplementedError) as error:  # refusals: raised alike on every rank, before any send
            results[(name, mode)] = {"refused": f"{type(error).__name__}: {error}"}
        except Exception:  # a failure, reported with the other cases' results (the peer may time out first)
            results[(name, mode)] = {"error": traceback.format_exc(limit=-4)}
        dist.barrier()
    return results
