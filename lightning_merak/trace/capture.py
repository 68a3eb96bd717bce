"""Proxy graph: one eager run of the pipelined module on the meta device, recording its data flow.

Units (the blocks a pipeline may cut between) are the module's children, expanded through containers and
through children larger than a whole stage. The run happens on a *meta twin* (a copy whose weights are meta
tensors: a 20B model plans in seconds on one CPU) under a ``TorchFunctionMode`` that tracks, for every tensor,
the set of units whose parameters it depends on (its *taint*) and every read of it outside the units (by the
parent's own code) or as a unit's argument, in time order; what the module returns counts as a last read
(``("output", leaf)``). Module hooks record each unit call: its arguments, its output (shapes for stubs), its
forward FLOPs. Each tensor also records where it was *made*, where that is a place a pipeline stage can hand it
over: a leaf of a unit call's output (``("out", call, leaf)``), or a leaf of the output of a module inside a unit
that has forward hooks of its own (``("side", call, module, n, leaf)``: transformers' recorders collect router
logits and hidden states that way, to read them after the last layer). Where the model's code needs real values
(a data-dependent check), the capture retries on a CPU twin with zero weights. No ``torch.fx``, no tracer: any
model that runs.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

from lightning_merak._compat import (
    has_forward_hooks,
    hook_free_memo,
    is_view_of_parameter,
    tree_flatten,
    without_output_capturing_flag,
)


class CaptureError(RuntimeError):
    """The pipelined module could not be run to capture its data flow; the message names the failure."""


def find_units(module: nn.Module, num_stages: int, expand: frozenset[str] = frozenset()) -> list[str]:
    """The blocks a pipeline may cut between: children, expanded through containers, through children holding
    more than half a stage's parameters, and through those named in ``expand`` (too many FLOPs)."""
    total = sum(p.numel() for p in module.parameters()) or 1
    limit = total / (2 * max(num_stages, 1))
    units: list[str] = []
    seen: set[int] = set()

    def visit(prefix: str, m: nn.Module) -> None:
        for name, child in m.named_children():
            fqn = f"{prefix}.{name}" if prefix else name
            if id(child) in seen:  # a module shared under two names (tied embeddings) is one block
                continue
            seen.add(id(child))
            n = sum(p.numel() for p in child.parameters())
            container = isinstance(child, (nn.ModuleList, nn.Sequential, nn.ModuleDict))
            # a module with parameters of its own (ViT's cls_token) stays whole: its forward uses them
            own = any(True for _ in child.parameters(recurse=False))
            if (container or n > limit or fqn in expand) and not own and any(True for _ in child.children()):
                visit(fqn, child)
            else:
                units.append(fqn)

    visit("", module)
    return units


def meta_twin(module: nn.Module, device: str = "meta") -> nn.Module:
    """A copy of ``module`` whose weights live on ``device`` (meta: no memory); no weight data is copied, and no
    hooks: the copy only records shapes, it must not run what others attached to the module."""
    memo = hook_free_memo(module)
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in memo:
            continue
        meta = t.detach().to("meta") if device == "meta" else torch.zeros(t.shape, dtype=t.dtype, device=device)
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return without_output_capturing_flag(copy.deepcopy(module, memo))


@dataclass
class Call:
    index: int
    unit: int
    args: list  # flat leaves (tensors or values) of (args, kwargs)
    output: Any
    flops: int = 0
    time: int = 0


@dataclass
class Capture:
    units: list[str]
    calls: list[Call]
    unit_params: list[int]
    unit_flops: list[int]
    unit_saved: list[int] = field(default_factory=list)  # bytes autograd saves for backward, per unit
    # per tensor key: taint set, reads [(time, (kind, ...))], shape, dtype, born, and where it was made: ``made``
    # (a unit call's output leaf) and ``side`` (a hooked inner module's output leaf), each a site tuple or None
    tensors: dict[int, dict] = field(default_factory=dict)
    first_call: list[int] = field(default_factory=list)   # per unit: first call index (or -1)
    # per unit: times its parameters are read outside its own calls (DeBERTa's relative embedding weight, read by
    # every layer although the embedding module is never called)
    param_reads: dict[int, list[int]] = field(default_factory=dict)
    # (call, module name, n) -> the output of the n-th call of that hooked module inside that unit call
    side_outputs: dict[tuple[int, str, int], Any] = field(default_factory=dict)

    def site_meta(self, site: tuple) -> Any:
        """The tensor (meta, or zeros on the CPU twin) at a site: ``("call", c, arg)``, ``("out", c, leaf)`` or
        ``("side", c, module, n, leaf)``; a stage asks its per-shape capture for its boundary shapes this way."""
        if site[0] == "call":
            return self.calls[site[1]].args[site[2]]
        if site[0] == "out":
            return tree_flatten(self.calls[site[1]].output)[0][site[2]]
        return tree_flatten(self.side_outputs[site[1:4]])[0][site[4]]


METADATA = {"register_hook", "__get__", "size", "dim", "numel", "stride", "is_floating_point", "element_size", "is_contiguous",
            "__len__", "data_ptr", "get_device", "nelement", "ndimension", "is_complex", "__format__", "__repr__"}


class _Taint(TorchFunctionMode):
    def __init__(self, cap: _Capturer) -> None:
        super().__init__()
        self.cap = cap

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        cap = self.cap
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        taint: set[int] = set()
        name = getattr(func, "__name__", str(func))
        for t in ins:
            taint |= cap.taint_of(t)
            if cap.depth == 0 and name not in METADATA:
                cap.read(t, ("op", name))
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor):
                cap.born.setdefault(o, cap.time)
                if taint:
                    cap.taint[o] = cap.taint.get(o, set()) | taint
        return out


class _Capturer:
    def __init__(self, twin: nn.Module, units: list[str]) -> None:
        self.twin, self.units = twin, units
        self.taint = WeakIdKeyDictionary()
        self.born = WeakIdKeyDictionary()
        self.param_unit = {}
        for i, name in enumerate(units):
            for p in twin.get_submodule(name).parameters():
                self.param_unit.setdefault(id(p), i)  # a tied weight belongs to its first user
        self.depth = 0
        self.current = 0
        self.time = 0
        self.calls: list[Call] = []
        self.keys = WeakIdKeyDictionary()
        self.alive: list[torch.Tensor] = []
        self.info: dict[int, dict] = {}
        self.param_reads: dict[int, list[int]] = {}
        self.made = WeakIdKeyDictionary()   # tensor -> ("out", call, leaf)
        self.side = WeakIdKeyDictionary()   # tensor -> ("side", call, module, n, leaf)
        self.side_outputs: dict[tuple[int, str, int], Any] = {}
        self.side_calls: dict[tuple[int, str], int] = {}

    def key(self, t: torch.Tensor) -> int:
        if t not in self.keys:
            self.keys[t] = len(self.alive)
            self.alive.append(t)
            self.info[self.keys[t]] = {"reads": [], "shape": tuple(t.shape), "dtype": t.dtype,
                                       "born": self.born.get(t, -1)}
        return self.keys[t]

    def taint_of(self, t: torch.Tensor) -> set[int]:
        if id(t) in self.param_unit:
            return {self.param_unit[id(t)]}
        return self.taint.get(t, set())

    def read(self, t: torch.Tensor, what: tuple) -> None:
        if id(t) in self.param_unit:
            self.param_reads.setdefault(self.param_unit[id(t)], []).append(self.time)
            return
        if not self.taint_of(t):
            return
        self.time += 1
        self.info[self.key(t)]["reads"].append((self.time, what))


def capture(module: nn.Module, args: tuple, kwargs: dict, units: list[str] | None = None) -> Capture:
    """Meta-device capture; where the model's code needs real values (data-dependent checks), a twin with
    zero weights on the CPU runs on the real inputs instead (same shapes, so stub outputs stay right)."""
    units = find_units(module, 1) if units is None else units
    try:
        return _capture(module, args, kwargs, units, "meta")
    except Exception as meta_error:
        try:
            return _capture(module, args, kwargs, units, "cpu")
        except Exception as error:
            where = getattr(error, "merak_module", "") or type(module).__name__
            raise CaptureError(f"cannot run {type(module).__name__} to capture its data flow: `{where}` raised "
                               f"(on meta: {meta_error}; on real tensors: {error})") from error


def _failing_module(twin: nn.Module, error: BaseException) -> str:
    """The innermost module whose forward raised: the last ``forward`` frame on the traceback."""
    names = {id(m): n for n, m in twin.named_modules()}
    found = ""
    tb = error.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self") if tb.tb_frame.f_code.co_name == "forward" else None
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = f"{names[id(owner)] or '<root>'} ({type(owner).__name__})"
        tb = tb.tb_next
    return found


def _capture(module: nn.Module, args: tuple, kwargs: dict, units: list[str], device: str) -> Capture:
    twin = meta_twin(module, device)
    cap = _Capturer(twin, units)
    flops = FlopCounterMode(display=False)
    unit_params = [sum(p.numel() * p.element_size() for p in twin.get_submodule(u).parameters()) for u in units]
    unit_flops = [0] * len(units)
    unit_saved = [0] * len(units)
    hooks = []
    for i, name in enumerate(units):
        sub = twin.get_submodule(name)

        def pre(mod, a, kw, i=i):
            if cap.depth == 0:
                cap.current = i
                leaves = tree_flatten((a, kw))[0]
                cap.time += 1
                call = Call(len(cap.calls), i, leaves, None, time=cap.time)
                cap.calls.append(call)
                for path, t in enumerate(leaves):
                    if isinstance(t, torch.Tensor):
                        cap.read(t, ("call", call.index, path))
                call.flops = flops.get_total_flops()
            cap.depth += 1

        def post(mod, a, kw, out, i=i):
            cap.depth -= 1
            if cap.depth == 0:
                call = cap.calls[-1]
                call.output = out
                call.flops = flops.get_total_flops() - call.flops
                unit_flops[i] += call.flops
                for leaf, o in enumerate(tree_flatten(out)[0]):
                    if isinstance(o, torch.Tensor):
                        if cap.born.get(o, call.time) >= call.time:  # made in this call, not passed through
                            cap.made.setdefault(o, ("out", call.index, leaf))
                        # a block without parameters (rotary tables, dropout) adds no taint of its own
                        cap.taint[o] = cap.taint_of(o) | ({i} if unit_params[i] else set())
                        cap.born.setdefault(o, cap.time)

        hooks.append(sub.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(sub.register_forward_hook(post, with_kwargs=True))
    unit_ids = {id(twin.get_submodule(u)) for u in units}
    names = {id(m): n for n, m in twin.named_modules()}

    def side(mod, a, out):
        # a hooked module inside a unit: what it returns may leave the unit through its hooks (the innermost wins)
        if cap.depth == 0 or id(mod) in unit_ids or id(mod) not in names or not has_forward_hooks(mod):
            return
        call, name = cap.calls[-1].index, names[id(mod)]
        n = cap.side_calls.get((call, name), 0)
        cap.side_calls[(call, name)] = n + 1
        cap.side_outputs[(call, name, n)] = out
        for leaf, o in enumerate(tree_flatten(out)[0]):
            if isinstance(o, torch.Tensor):
                cap.side.setdefault(o, ("side", call, name, n, leaf))

    meta = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    margs = [meta(a) for a in args]
    mkwargs = {k: meta(v) for k, v in kwargs.items()}
    def pack(t: torch.Tensor) -> torch.Tensor:
        # bytes autograd keeps for backward, per block: the activation memory a micro-batch holds (a weight, or a
        # view of one such as the transpose nn.Linear saves, takes no memory of its own)
        if cap.depth > 0 and not isinstance(t, nn.Parameter) and not is_view_of_parameter(t):
            unit_saved[cap.current] += t.numel() * t.element_size()
        return t

    hooks.append(torch.nn.modules.module.register_module_forward_hook(side))  # removed with the others below
    try:
        # with grad even for an evaluation step: saved bytes are a training figure, and torch's module tracker
        # (under the FLOP counter) fails on a parameter passed to a module under no_grad (DeBERTa's rel_embeddings)
        with torch.enable_grad(), flops, _Taint(cap), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            returned = twin(*margs, **mkwargs)
        for leaf, o in enumerate(tree_flatten(returned)[0]):  # what the module returns is read after every block
            if isinstance(o, torch.Tensor):
                cap.read(o, ("output", leaf))
    except Exception as error:
        error.merak_module = _failing_module(twin, error)
        raise
    finally:
        for h in hooks:
            h.remove()
    result = Capture(units, cap.calls, unit_params, unit_flops, unit_saved, param_reads=cap.param_reads,
                     side_outputs=cap.side_outputs)
    result.tensors = {k: dict(v, taint=cap.taint_of(cap.alive[k]), made=cap.made.get(cap.alive[k]),
                              side=cap.side.get(cap.alive[k])) for k, v in cap.info.items()}
    result.first_call = [next((c.index for c in cap.calls if c.unit == u), -1) for u in range(len(units))]
    return result


_BY_VALUE = (int, float, bool, str, type(None))


def shape_signature(args: tuple, kwargs: dict) -> tuple:
    """Shapes and dtypes of every tensor in a call (plain leaves by value, other objects by type): caches keyed
    per input shape — a proxy capture and a PipelineStage per signature, a DELTA plan per signature."""
    leaves = tree_flatten((args, kwargs))[0]
    return tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor)
                 else (t if isinstance(t, _BY_VALUE) else type(t).__name__) for t in leaves)


CAPTURE_CACHE = 8  # proxy captures kept per stage, one per input-shape signature (least recently used dropped first)

V = TypeVar("V")


class ShapeCache(MutableMapping[tuple, V]):
    """Values per ``shape_signature``, the least recently used dropped beyond ``size`` entries: batches padded to
    their own length bring a new shape each, and a run must not keep one capture, schedule or DELTA plan per
    shape it ever saw. Reading or writing an entry makes it the most recent; iterating does not."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"ShapeCache(size={size}) must hold at least one entry")
        self.size = size
        self._data: OrderedDict[tuple, V] = OrderedDict()

    def __getitem__(self, key: tuple) -> V:
        value = self._data[key]
        self._data.move_to_end(key)
        return value

    def __setitem__(self, key: tuple, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

    def __delitem__(self, key: tuple) -> None:
        del self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def values(self):  # noqa: ANN201 - a view, without touching recency
        return self._data.values()

    def items(self):  # noqa: ANN201
        return self._data.items()
