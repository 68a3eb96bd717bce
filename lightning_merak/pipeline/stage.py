"""Eager stage building: this rank's stage runs the pipelined module's *own* forward.

``build_stage`` prunes the module in place: blocks of other stages keep their structure but hold no
parameters or buffers (they become plain meta tensors, so ``block.weight.dtype`` still reads), and their
forward returns zeros shaped as the proxy capture recorded for that call. Parameter-free blocks (dropout,
rotary tables) run for real on every stage. At the first use of each tensor the previous stage sends, the
received value is written in place into that argument (``copy_`` under autograd, so consumers, the parent's
locals included, see it and gradients flow back to the receive buffer). A *carried* tensor (read by the parent's
code or returned, never a later block's argument: ``partition/plan.py``) is handed back where the one-process
forward made it: as that leaf of the (stub's) output of the block call that made it, or by calling the hooked
inner module that returned it (its forward replaced by the received value), so that its hooks (transformers'
router-logit and hidden-state recorders) collect it as they would have. Once every tensor the next stage needs
has been seen (as an argument of a later block, or at the site a carried one is made, received ones included),
the forward stops and returns them. Owned blocks keep their original names: optimizers see only local
parameters and checkpoints are topology-free.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_merak._compat import (
    strip_module_state,
    tensor_parallel_mesh,
    tree_flatten,
    tree_map,
    tree_unflatten,
)
from lightning_merak.intercept import wrap_forward
from lightning_merak.partition.plan import PartitionPlan, sites
from lightning_merak.trace import Capture, capture, meta_twin, shape_signature
from lightning_merak.trace.capture import CAPTURE_CACHE, ShapeCache


class _Stop(Exception):
    pass


def _zeros_like_meta(out: Any, device: torch.device) -> Any:
    return tree_map(lambda t: torch.zeros(t.shape, dtype=t.dtype, device=device)
                    if isinstance(t, torch.Tensor) else t, out)


class StageModule(nn.Module):
    """This rank's pipeline stage: runs the pipelined module's own forward eagerly.

    ``forward(*received, model_args, model_kwargs)`` returns the plan's boundary tensors for the next stage
    (in ``plan.stages[i].sends`` order), or on the last stage whatever the module returns. The pruned module
    is ``self.module``; a meta twin of the full module (``self.twin``, unregistered) re-captures stub shapes
    per input-shape signature.
    """

    def __init__(self, module: nn.Module, plan: PartitionPlan, stage_index: int, units: _Units,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.stage_index = stage_index
        self.num_stages = len(plan.stages)
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "plan", plan)
        object.__setattr__(self, "twin", units.twin)
        object.__setattr__(self, "shared", units)
        st = plan.stages[stage_index]
        self.owned = frozenset(range(st.first, st.first + len(st.units)))
        cap = plan.capture
        k_in = st.first
        self.recv_keys = plan.stages[stage_index - 1].sends if stage_index > 0 else []
        self.send_keys = st.sends
        k_out = st.first + len(st.units)
        # per tensor, the sites where it is received (all of them) and taken to send (the first): partition.sites
        self.recv_sites = [sites(cap, key, k_in) for key in self.recv_keys]
        self.send_sites = [sites(cap, key, k_out)[0] for key in self.send_keys]
        self.recv_at = {where[1:]: i for i, (where, *_) in enumerate(self.recv_sites) if where[0] == "call"}
        self.send_at = {where[1:]: i for i, where in enumerate(self.send_sites) if where[0] == "call"}
        self.recv_carried: dict[int, list[tuple[tuple, int]]] = {}   # call -> [(site, received index)]
        for i, found in enumerate(self.recv_sites):
            for where in found:
                if where[0] != "call":
                    self.recv_carried.setdefault(where[1], []).append((where, i))
        self.send_outs: dict[int, list[tuple[int, int]]] = {}         # call -> [(output leaf, send index)]
        self.send_sides: dict[tuple, list[tuple[int, int]]] = {}      # (call, module, n) -> [(leaf, send index)]
        for j, where in enumerate(self.send_sites):
            if where[0] == "out":
                self.send_outs.setdefault(where[1], []).append((where[2], j))
            elif where[0] == "side":
                self.send_sides.setdefault(where[1:4], []).append((where[4], j))
        if device is None:  # where this stage's parameters are (a meta-built module: pass the device)
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
        object.__setattr__(self, "device", device)
        self._signatures: ShapeCache[Capture] = ShapeCache(CAPTURE_CACHE)
        self._hooks: list[Any] = []
        self.install_hooks()
        units.stages.append(self)
        self._state: dict | None = None
        self.split_backward = False  # set for schedules that split backward into input and weight gradients
        self._own: list[nn.Parameter] | None = None

    def install_hooks(self) -> None:
        """The pre-hooks that write received tensors into block arguments and stop once the sends exist; the
        hooks that hand carried tensors back at the block outputs and hooked modules that made them, and take
        the carried ones this stage sends (first among a block's forward hooks, before any recorder)."""
        if not self._hooks:
            for name in self.plan.units:
                block = self.module.get_submodule(name)
                self._hooks.append(block.register_forward_pre_hook(self._pre_hook(), with_kwargs=True))
                self._hooks.append(block.register_forward_hook(self._post_hook(), prepend=True))
            for name in sorted({where[2] for where in self.send_sites if where[0] == "side"}):
                self._hooks.append(self.module.get_submodule(name).register_forward_hook(self._side_hook(name),
                                                                                         prepend=True))

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def own_parameters(self) -> list[nn.Parameter]:
        """The parameters of this stage's blocks (``module`` is not a registered submodule, so ``parameters()`` is
        empty): what torch's split backward (ZB-V's weight step) differentiates. Read at the first step, after
        tensor parallelism has replaced them with DTensors."""
        if self._own is None:
            params: dict[int, nn.Parameter] = {}
            shared = self.plan.stages[self.stage_index].shared
            for name in [self.plan.units[u] for u in sorted(self.owned)] + shared:
                for p in self.module.get_submodule(name).parameters():
                    params.setdefault(id(p), p)
            self._own = list(params.values())
        return self._own

    def checkpoint_units(self, n: int) -> None:
        """Recompute the first ``n`` owned blocks in backward (stage-aware recomputation: earlier stages hold
        more micro-batches in flight); non-reentrant, RNG state preserved so dropout replays identically. A new
        ``n`` ("auto" after measuring) replaces the old one."""
        first = self.plan.stages[self.stage_index].first
        for u in self.owned:
            self.shared.checkpointed.discard(u)
            if u < first + n:
                self.shared.checkpointed.add(u)

    def checkpoint_ratio(self, ratio: float) -> None:
        """Checkpoint the share ``ratio`` of this stage's blocks, rounded up to whole blocks."""
        self.checkpoint_units(math.ceil(ratio * len(self.owned) - 1e-9))

    def _capture_for(self, args: tuple, kwargs: dict) -> Capture:
        sig = shape_signature(args, kwargs)
        if sig not in self._signatures:
            self._signatures[sig] = capture(self.twin, args, kwargs, self.plan.units)
        return self._signatures[sig]

    def boundary_metas(self, args: tuple, kwargs: dict) -> tuple[tuple, tuple]:
        cap = self._capture_for(args, kwargs)
        recv = [cap.site_meta(found[0]) for found in self.recv_sites]
        send = [cap.site_meta(where) for where in self.send_sites]
        if self.stage_index == self.num_stages - 1:
            send = [torch.empty((), device="meta")]
        return tuple(recv), tuple(send)

    def _stub_output(self, mesh: Any = None) -> Any:
        """Zeros shaped as the block's output in the proxy capture. ``mesh``: the block is tensor-parallel, so
        torch's output hook expects a DTensor; replicated zeros convert to any layout without communication."""
        state = self._state
        call = state["cap"].calls[state["call"]]
        out = _zeros_like_meta(call.output, self.device)
        if mesh is None:
            return out
        from torch.distributed.tensor import DTensor, Replicate

        return tree_map(lambda t: DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)
                        if isinstance(t, torch.Tensor) else t, out)

    def _pre_hook(self):
        def hook(mod, args, kwargs):
            state = self._state
            if state is None:
                return None
            c = state["call"] = state["next"]
            state["next"] += 1
            leaves = None
            for (cc, p), i in self.recv_at.items():
                if cc == c:
                    leaves = leaves or tree_flatten((args, kwargs))[0]
                    leaves[p].copy_(state["received"][i])
            for (cc, p), i in self.send_at.items():
                if cc == c:
                    leaves = leaves or tree_flatten((args, kwargs))[0]
                    state["sent"][i] = leaves[p]
            if self.send_sites and all(v is not None for v in state["sent"]):
                raise _Stop
            return None
        return hook

    def _post_hook(self):
        def hook(mod, args, out):
            state = self._state
            if state is None or state["call"] < 0:
                return None
            c = state["call"]
            handed = [(where, state["received"][i]) for where, i in self.recv_carried.get(c, ())]
            by_module: dict[tuple, dict[int, torch.Tensor]] = {}
            for where, value in handed:
                if where[0] == "side":
                    by_module.setdefault(where[2:4], {})[where[4]] = value
            for (name, n), values in by_module.items():  # hooked modules first, as inside the block
                self._replay(state, c, name, n, values)
            outs = {where[2]: value for where, value in handed if where[0] == "out"}
            if outs:  # the stub (or a parameter-free block run on stub inputs) returns what the sender made
                leaves, spec = tree_flatten(out)
                out = tree_unflatten([outs.get(q, leaf) for q, leaf in enumerate(leaves)], spec)
            if c in self.send_outs:
                leaves = tree_flatten(out)[0]
                for q, j in self.send_outs[c]:
                    state["sent"][j] = leaves[q]
            return out if outs else None
        return hook

    def _side_hook(self, name: str):
        def hook(mod, args, out):
            state = self._state
            if state is None or state["call"] < 0:
                return None
            c = state["call"]
            n = state["side_calls"].get((c, name), 0)
            state["side_calls"][(c, name)] = n + 1
            take = self.send_sides.get((c, name, n))
            if take:
                leaves = tree_flatten(out)[0]
                for q, j in take:
                    state["sent"][j] = leaves[q]
            return None
        return hook

    def _replay(self, state: dict, call: int, name: str, n: int, values: dict[int, torch.Tensor]) -> None:
        """Call the hooked module ``name`` of a stub block with its forward returning what the sender's copy
        returned (received leaves; zeros elsewhere, shaped as captured), so its hooks see the sender's values."""
        leaves, spec = tree_flatten(state["cap"].side_outputs[(call, name, n)])
        leaves = [values[q] if q in values else _zeros_like_meta(leaf, self.device) for q, leaf in enumerate(leaves)]
        out = tree_unflatten(leaves, spec)
        inner = self.module.get_submodule(name)
        wrap = wrap_forward(inner, "stage", lambda forward: lambda *a, **k: out)
        state["side_calls"][(call, name)] = n
        try:
            inner()
        finally:
            wrap.remove()

    def forward(self, *received: torch.Tensor, model_args: tuple = (), model_kwargs: dict | None = None) -> Any:
        model_kwargs = model_kwargs or {}
        cap = self._capture_for(model_args, model_kwargs)
        self._state = {"cap": cap, "call": -1, "next": 0, "received": received,
                       "sent": [None] * len(self.send_sites), "side_calls": {}}
        outer, self.shared.running = self.shared.running, self
        try:
            out = self.module(*model_args, **model_kwargs)
        except _Stop:
            return tuple(_sendable(t, self.split_backward) for t in self._state["sent"])
        finally:
            sent = self._state
            self._state = None
            self.shared.running = outer
        if self.stage_index < self.num_stages - 1:
            raise RuntimeError(f"stage {self.stage_index} finished the forward without reaching the next stage: "
                               f"{sum(v is None for v in sent['sent'])} boundary tensors were never produced")
        return out


def _sendable(t: torch.Tensor, copy: bool) -> torch.Tensor:
    """A boundary tensor as the stage returns it: a fresh tensor (a block argument may also be read later), in the
    plain contiguous layout that point-to-point sends need and receive buffers have (T5's position bias is a
    permuted view, a CNN's activation may be channels-last, a mask expanded), copied only when it is not.

    ``copy``: a split backward (ZB-V's I/W) detaches the stage outputs in place, which views do not allow.
    """
    if copy:
        return t.clone(memory_format=torch.contiguous_format)
    return t.view_as(t) if t.is_contiguous() else t.contiguous()



class _Units:
    """The blocks of one pruned module, shared by the stages built on it (two per rank for interleaved and V
    schedules). Each block with parameters is dispatched (``intercept`` layer "stage"): live (its forward, or
    the checkpointed one) while a stage that owns it is running, else the running stage's zero stub. Blocks no
    local stage owns are stripped of their parameters and can only be stubs."""

    def __init__(self, module: nn.Module, plan: PartitionPlan, local: set[int]) -> None:
        self.twin = meta_twin(module)  # before any stripping
        self.running: StageModule | None = None
        self.checkpointed: set[int] = set()
        self.stages: list[StageModule] = []
        self._wraps: list[Any] = []
        self._dispatched: list[tuple[nn.Module, int, bool]] = []
        for u, name in enumerate(plan.units):
            sub = module.get_submodule(name)
            stateful = any(True for _ in sub.parameters())
            if u not in local and not stateful:
                continue  # parameter-free blocks (dropout, rotary tables) run for real on every stage
            if u not in local:
                strip_module_state(sub)
            self._dispatched.append((sub, u, stateful))
        self.install()

    def _dispatch(self, sub: nn.Module, unit: int, stateful: bool):
        def wrapper(inner):
            def forward(*args: Any, **kwargs: Any) -> Any:
                stage = self.running
                if stage is None or unit in stage.owned or not stateful:
                    if unit in self.checkpointed:
                        return checkpoint(inner, *args, use_reentrant=False, **kwargs)
                    return inner(*args, **kwargs)
                return stage._stub_output(tensor_parallel_mesh(sub))
            return forward
        return wrapper

    def install(self) -> None:
        """Dispatch every block (``intercept`` layer "stage") and hook every stage; again after ``remove``."""
        if not self._wraps:
            self._wraps = [wrap_forward(sub, "stage", self._dispatch(sub, u, stateful))
                           for sub, u, stateful in self._dispatched]
        for stage in self.stages:
            stage.install_hooks()

    def remove(self) -> None:
        """Take out the dispatch and every stage's hooks (teardown); the pruned blocks stay pruned."""
        for wrap in self._wraps:
            wrap.remove()
        self._wraps = []
        for stage in self.stages:
            stage.remove_hooks()


def build_stages(module: nn.Module, plan: PartitionPlan, stage_indices: list[int],
                 device: torch.device | None = None) -> list[StageModule]:
    """Prune ``module`` in place to the stages ``stage_indices`` of ``plan`` (this rank's) and wrap each. Weights
    tied across stages (``plan.tied``) stay on every stage that uses them; their gradients must be all-reduced
    between the ranks holding them."""
    local = {u for i in stage_indices
             for u in range(plan.stages[i].first, plan.stages[i].first + len(plan.stages[i].units))}
    local |= {plan.units.index(name) for i in stage_indices for name in plan.stages[i].shared}
    units = _Units(module, plan, local)
    return [StageModule(module, plan, i, units, device) for i in stage_indices]


def build_stage(module: nn.Module, plan: PartitionPlan, stage_index: int) -> StageModule:
    """``build_stages`` for one stage per rank."""
    return build_stages(module, plan, [stage_index])[0]
