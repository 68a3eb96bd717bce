"""Which module gets which tensor-parallel style: the ``TPPlan``.

Two sources, in order: a transformers model's own plan (``model.tp_plan``, built from
``config.base_model_tp_plan``), else automatic detection from one eager forward (Merak §9 matched layers by
name or by in:out ratio per model family; data flow needs no per-family table):

- a linear layer A (``nn.Linear`` or HF ``Conv1D``) whose output reaches linear layer B's input only through
  element-wise, reshaping or attention operations makes a column-parallel (A) / row-parallel (B) pair;
- A's output split into n equal parts before use (GPT-2's fused q|k|v) is sharded per part (``colwise_fused``);
- the token embedding and the output head are vocabulary-parallel, the head's logits gathered so that any loss
  stays correct. The head is found by structure, never by a size: the model's ``get_output_embeddings()``, else
  the linear layer whose weight is tied to the token embedding, else the one whose output is the logits the
  model returns (a layer that merely has the vocabulary's width, Mamba's ``dt_proj``, is not a head);
- ``nn.MultiheadAttention`` is split by heads as one unit;
- position information built per head is sharded with the heads: an embedding inside an attention module with
  one column per head (T5's relative position bias) is split by columns, and a parameter-free per-head tensor an
  attention module receives from the model (BLOOM's ALiBi, batch × heads) is sliced to this rank's heads.

The plan is pure data: printable (``.table()``), checked for divisibility against the TP size here, with
clear errors, before any process group exists.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_merak._compat import tree_leaves
from lightning_merak.tensor_parallel.styles import _is_conv1d

#: style names a plan may hold; ``apply_tensor_parallel`` maps each to a ParallelStyle
STYLES = ("colwise", "colwise_fused", "rowwise", "embedding_vocab", "head_vocab_gather", "mha_heads",
          "embedding_heads", "moe_experts")

#: transformers' style names (``config.base_model_tp_plan`` / ``_tp_plan``) that we translate
_HF_STYLES = {"colwise": "colwise", "rowwise": "rowwise", "colwise_gather_output": "head_vocab_gather",
              "embedding_rowwise": "embedding_vocab", "packed_colwise": "colwise_fused", "moe_tp_experts": "moe_experts"}

#: module attributes holding a head count or a head-count-derived width, divided by t on the attention module
HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "n_head", "n_heads", "split_size",
              "all_head_size", "inner_dim")


@dataclass
class TPPlan:
    """FQN → style name, with the per-module attribute changes the sharding implies."""

    tp_size: int
    styles: dict[str, str]
    fused: dict[str, int] = field(default_factory=dict)  # colwise_fused FQN → number of packed parts
    attributes: dict[str, dict[str, int]] = field(default_factory=dict)  # FQN → {attr: local value}
    source: str = "auto"  # "hf" (the model's own plan) or "auto" (detected)
    # attention FQN → {argument (name, or position as "0", "1"...): (layout, full head count)}; layout "heads"
    # (dim 1 counts heads) or "batch_heads" (dim 0 counts batch × heads, batch-major): sliced to local heads
    head_inputs: dict[str, dict[str, tuple[str, int]]] = field(default_factory=dict)
    parameters: int = 0  # of the whole module
    sharded_parameters: int = 0  # of those, split across the TP ranks
    blocks_without_tp: str | None = None  # the repeated blocks (e.g. "model.layers") when none of them is sharded

    @property
    def sharded_share(self) -> float:
        return self.sharded_parameters / self.parameters if self.parameters else 0.0

    def sharded(self, module: nn.Module) -> set[int]:
        """Ids of the parameters of ``module`` (the module the plan was made for) split across the TP ranks: every
        parameter of a styled module but a row-parallel bias, which stays replicated."""
        names = dict(module.named_modules())
        return {id(p) for fqn, style in self.styles.items() if fqn in names
                for pname, p in names[fqn].named_parameters() if not (style == "rowwise" and pname == "bias")}

    def table(self) -> str:
        width = max([len(k) for k in self.styles] + [6])
        lines = [f"TP plan (tp={self.tp_size}, source={self.source})", f"{'module':<{width}}  style"]
        for fqn, style in self.styles.items():
            extra = f" ×{self.fused[fqn]}" if fqn in self.fused else ""
            lines.append(f"{fqn:<{width}}  {style}{extra}")
        for fqn, attrs in self.attributes.items():
            lines.append(f"{fqn:<{width}}  set " + ", ".join(f"{a}={v}" for a, v in attrs.items()))
        for fqn, inputs in self.head_inputs.items():
            lines.append(f"{fqn:<{width}}  input " + ", ".join(f"{k} ({layout.replace('_', ' × ')} of {heads})"
                                                                for k, (layout, heads) in inputs.items())
                         + " sliced to this rank's heads where it holds all")
        if self.parameters:
            lines.append(f"TP shards {self.sharded_share:.1%} of the parameters ({self.sharded_parameters:,} of "
                         f"{self.parameters:,})")
        if self.blocks_without_tp:
            lines.append(f"warning: {self.blocks_without_tp_message()}")
        return "\n".join(lines)

    def blocks_without_tp_message(self) -> str:
        return (f"no layer of the blocks `{self.blocks_without_tp}` is tensor-parallel: they run replicated on every "
                f"TP rank (TP shards {self.sharded_share:.1%} of the parameters). Use pipeline or data parallelism "
                "for this model (tensor_parallel_size=1), or give it a tp plan (transformers' "
                "config.base_model_tp_plan).")

    __str__ = table


def tp_plan_for(module: nn.Module, tp_size: int, example_inputs: tuple | dict | None = None) -> TPPlan:
    """The model's TP plan: its transformers plan if it has one, else detected from a forward on example inputs.

    ``example_inputs``: positional inputs (a tuple or one tensor), keyword inputs (a dict), or ``(args, kwargs)``;
    None builds small ones from the model's config or signature. Call it on the whole model, before pipeline
    stages are cut out of it; the forward runs in eval mode with the RNG state restored afterwards.
    """
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    styles, fused = _hf_plan(module)
    source, observed = "hf", {}
    if not styles:
        styles, fused, observed = _detect_plan(module, example_inputs)
        source = "auto"
    styles.update(_head_embeddings(module, styles))
    if not styles:
        raise ValueError(f"{type(module).__name__} has nothing to shard for tensor parallelism: no transformers "
                         "tp plan, no linear pair (column → row) connected by element-wise or attention operations, "
                         "no vocabulary embedding/head and no nn.MultiheadAttention. Use tensor_parallel_size=1.")
    plan = TPPlan(tp_size, styles, fused, source=source)
    plan.attributes = _validate_and_attributes(module, plan)
    plan.head_inputs = _head_inputs(module, plan, observed)
    _coverage(module, plan)
    if plan.blocks_without_tp:
        warnings.warn(f"{type(module).__name__}: {plan.blocks_without_tp_message()}", stacklevel=2)
    return plan


def _coverage(module: nn.Module, plan: TPPlan) -> None:
    """How many parameters the plan shards, and whether the repeated blocks (the largest ModuleList) got any."""
    names = dict(module.named_modules())
    sharded = plan.sharded(module)
    plan.parameters = sum(p.numel() for p in module.parameters())
    plan.sharded_parameters = sum(p.numel() for p in module.parameters() if id(p) in sharded)
    lists = [(fqn, m) for fqn, m in names.items() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if lists:
        fqn, _ = max(lists, key=lambda fm: sum(p.numel() for p in fm[1].parameters()))
        if not any(style_fqn.startswith(f"{fqn}.") for style_fqn in plan.styles):
            plan.blocks_without_tp = fqn


# ---- transformers' own plan ----------------------------------------------------------------------------

def _hf_plan(module: nn.Module) -> tuple[dict[str, str], dict[str, int]]:
    """Expand the outermost transformers models' ``tp_plan`` (wildcards) into concrete FQNs of ``module``."""
    import re

    styles: dict[str, str] = {}
    fused: dict[str, int] = {}
    names = dict(module.named_modules())
    done: list[str] = []
    for prefix, sub in names.items():
        plan = getattr(sub, "tp_plan", None) if hasattr(sub, "config") else None
        if not isinstance(plan, dict) or not plan or any(prefix.startswith(p) for p in done):
            continue
        base = f"{prefix}." if prefix else ""
        done.append(base)
        for pattern, hf_style in plan.items():
            if hf_style not in _HF_STYLES:
                raise NotImplementedError(f"transformers tp style {hf_style!r} (for {pattern!r}) is not supported; "
                                          f"supported: {sorted(_HF_STYLES)}")
            regex = re.compile("^" + re.escape(base + pattern).replace(r"\*", r"\d+") + "$")
            for fqn in names:
                if regex.match(fqn):
                    styles[fqn] = _HF_STYLES[hf_style]
                    if hf_style == "packed_colwise":
                        fused[fqn] = 2
    return styles, fused


# ---- automatic detection --------------------------------------------------------------------------------

_PROPAGATE = {
    "view", "reshape", "transpose", "permute", "contiguous", "split", "chunk", "unbind", "getitem", "flatten",
    "unflatten", "expand", "expand_as", "repeat_interleave", "squeeze", "unsqueeze", "to", "float", "half",
    "bfloat16", "type", "type_as", "clone", "narrow", "select", "cat", "add", "radd", "iadd", "sub", "rsub",
    "isub", "mul", "rmul", "imul", "div", "truediv", "rtruediv", "itruediv", "neg", "pow", "exp", "tanh",
    "sigmoid", "relu", "gelu", "silu", "softmax", "log_softmax", "dropout", "matmul", "bmm", "baddbmm", "masked_fill", "where",
    "clamp", "scaled_dot_product_attention", "erf", "sqrt",
}


class _FlowTracer(TorchFunctionMode):
    """Labels every tensor with the linear layers whose output reaches it through ``_PROPAGATE`` operations."""

    def __init__(self) -> None:
        super().__init__()
        self.labels: dict[int, tuple[torch.Tensor, frozenset]] = {}
        self.direct: dict[int, str] = {}  # id of a linear layer's output tensor → the layer
        self.splits: dict[str, int] = {}  # layer → parts its direct output was split into

    def label(self, t) -> frozenset:
        hit = self.labels.get(id(t)) if isinstance(t, torch.Tensor) else None
        return hit[1] if hit is not None and hit[0] is t else frozenset()

    def set(self, t: torch.Tensor, labels: frozenset) -> None:
        self.labels[id(t)] = (t, labels)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "").strip("_")
        if name.endswith("_") and name[:-1] in _PROPAGATE:
            name = name[:-1]
        flat = tree_leaves((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        labels = frozenset().union(*(self.label(t) for t in tensors))
        if not labels or name not in _PROPAGATE:
            return out
        # an operand without a label that depends on parameters or has the full shape (a residual stream)
        # mixes all features in: stop here. Broadcast constants (masks, rotary tables) pass, and so does a
        # per-head bias broadcast over the batch (T5's learned relative position bias on the attention scores).
        shape = next(t.shape for t in tensors if self.label(t))
        if any(not self.label(t) and t.numel() > 1 and (t.requires_grad or t.shape == shape)
               and not _per_head_bias(t.shape, shape) for t in tensors):
            return out
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if name in ("split", "chunk") and tensors and id(tensors[0]) in self.direct and len(outs) > 1:
            src = tensors[0]
            if all(o.shape[-1] * len(outs) == src.shape[-1] for o in outs):
                self.splits[self.direct[id(src)]] = len(outs)
        for t in outs:
            self.set(t, labels)
        return out


def _per_head_bias(bias: torch.Size, scores: torch.Size) -> bool:
    """(1, heads, queries, keys) added to (batch, heads, queries, keys) attention scores."""
    return len(bias) == len(scores) == 4 and bias[0] == 1 < scores[0] and bias[1:] == scores[1:]


def _linears(module: nn.Module) -> dict[str, nn.Module]:
    mhas = [n for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)]
    return {n: m for n, m in module.named_modules()
            if (isinstance(m, nn.Linear) or _is_conv1d(m)) and not any(n.startswith(p + ".") for p in mhas)}


def _detect_plan(module: nn.Module, example_inputs) -> tuple[dict[str, str], dict[str, int]]:
    linears = _linears(module)
    tracer = _FlowTracer()
    edges: set[tuple[str, str]] = set()
    handles = []
    for fqn, lin in linears.items():
        def pre(_m, args, fqn=fqn):
            if args and isinstance(args[0], torch.Tensor):
                edges.update((src, fqn) for src in tracer.label(args[0]))

        def post(_m, _args, out, fqn=fqn):
            tracer.set(out, frozenset([fqn]))
            tracer.direct[id(out)] = fqn

        handles += [lin.register_forward_pre_hook(pre), lin.register_forward_hook(post)]
    observed: dict[str, dict[str, tuple[tuple[int, ...], int]]] = {}
    for fqn, m in module.named_modules():
        if _query_heads(m) and not isinstance(m, nn.MultiheadAttention):
            def see(_m, a, kw, fqn=fqn):
                if fqn not in observed:
                    observed[fqn] = _per_head_candidates(a, kw, tracer)
            handles.append(m.register_forward_pre_hook(see, with_kwargs=True))
    args, kwargs = _example_inputs(module, example_inputs)
    # no side effects on the run that follows: no RNG draws (dropout), no BatchNorm statistics, modes restored
    modes = {m: m.training for m in module.modules()}
    devices = [d for d in {a.device for a in module.parameters()} if d.type == "cuda"]
    try:
        with torch.random.fork_rng(devices=devices), tracer, torch.enable_grad():
            module.eval()
            output = module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training

    cols = {a for a, _ in edges}
    rows = {b for _, b in edges}
    both = cols & rows  # a layer on both ends of pairs (stacked linears without a norm) is left replicated
    styles: dict[str, str] = {}
    for fqn in linears:  # keep module order
        if fqn in cols and fqn not in both and all(b not in both for a, b in edges if a == fqn):
            styles[fqn] = "colwise_fused" if tracer.splits.get(fqn, 1) > 1 else "colwise"
        elif fqn in rows and fqn not in both and all(a not in both for a, b in edges if b == fqn):
            styles[fqn] = "rowwise"
    fused = {f: tracer.splits[f] for f, s in styles.items() if s == "colwise_fused"}
    for fqn, m in module.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            styles[fqn] = "mha_heads"
    styles.update(_vocab_styles(module, linears, styles, _logits_layer(output, tracer)))
    return styles, fused, observed


def _logits_layer(output, tracer: _FlowTracer) -> str | None:
    """The linear layer whose output is the model's logits (``output.logits``, or a tensor output), directly or
    through element-wise operations (a ``log_softmax``)."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, torch.Tensor):
        logits = output
    if logits is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        return None
    labels = tracer.label(logits)
    return tracer.direct.get(id(logits)) or (next(iter(labels)) if len(labels) == 1 else None)


def _per_head_candidates(args: tuple, kwargs: dict, tracer: _FlowTracer) -> dict[str, tuple[tuple[int, ...], int]]:
    """An attention module's parameter-free floating inputs (no layer's output flows into them; no gradient):
    argument → (shape, batch size of its first input)."""
    items = [(str(i), a) for i, a in enumerate(args)] + list(kwargs.items())
    first = next((t for _, t in items if isinstance(t, torch.Tensor) and t.dim() >= 2), None)
    if first is None:
        return {}
    return {key: (tuple(t.shape), first.shape[0]) for key, t in items
            if isinstance(t, torch.Tensor) and t is not first and t.is_floating_point() and not t.requires_grad
            and not tracer.label(t)}


def _head_inputs(module: nn.Module, plan: TPPlan, observed: dict) -> dict[str, dict[str, tuple[str, int]]]:
    """Per-head tensors the model builds for all heads and hands to attention modules whose heads are sharded."""
    names = dict(module.named_modules())
    out: dict[str, dict[str, tuple[str, int]]] = {}
    for fqn in plan.attributes:
        heads = _query_heads(names[fqn])
        for key, (shape, batch) in observed.get(fqn, {}).items():
            if len(shape) == 3 and shape[0] == batch * heads:
                out.setdefault(fqn, {})[key] = ("batch_heads", heads)
            elif len(shape) == 4 and shape[1] == heads and shape[0] in (1, batch) and heads > 1:
                out.setdefault(fqn, {})[key] = ("heads", heads)
    return out


def _head_embeddings(module: nn.Module, styles: dict[str, str]) -> dict[str, str]:
    """An embedding inside an attention module whose heads are sharded, with one column per head (T5's relative
    position bias): split by columns, so the bias it makes holds this rank's heads."""
    names = dict(module.named_modules())
    sharded = {owner for fqn, style in styles.items() if style.startswith("colwise")
               for owner in [(_head_owner(names, fqn) or ("",))[0]] if owner}
    out = {}
    for fqn, m in names.items():
        owner = _head_owner(names, fqn) if isinstance(m, nn.Embedding) and fqn not in styles else None
        if owner and owner[0] in sharded and m.embedding_dim == _query_heads(owner[1]):
            out[fqn] = "embedding_heads"
    return out


def _vocab_size(module: nn.Module) -> int | None:
    for m in module.modules():
        config = getattr(m, "config", None)
        if isinstance(getattr(config, "vocab_size", None), int):
            return config.vocab_size
        if isinstance(getattr(m, "vocab_size", None), int):
            return m.vocab_size
    return None


def _vocab_styles(module: nn.Module, linears: dict[str, nn.Module], styles: dict[str, str],
                  logits_layer: str | None) -> dict[str, str]:
    """Token embedding(s) and the output head (see the module docstring): vocabulary-parallel."""
    vocab = _vocab_size(module)
    embeddings = {n: m for n, m in module.named_modules() if isinstance(m, nn.Embedding)}
    if vocab is None and embeddings:
        vocab = max(m.num_embeddings for m in embeddings.values())
    if vocab is None:
        return {}
    out = {n: "embedding_vocab" for n, m in embeddings.items() if m.num_embeddings == vocab}
    head = _output_head(module, linears, out, logits_layer)
    if head is not None and head not in styles:
        lin = linears[head]
        if (lin.nf if _is_conv1d(lin) else lin.out_features) == vocab:  # a classifier head stays replicated
            out[head] = "head_vocab_gather"
    return out


def _output_head(module: nn.Module, linears: dict[str, nn.Module], token_embeddings: dict[str, str],
                 logits_layer: str | None) -> str | None:
    names = {id(m): n for n, m in module.named_modules()}
    get = getattr(module, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module) and names.get(id(head)) in linears:
        return names[id(head)]
    tied = {id(module.get_submodule(n).weight) for n in token_embeddings}
    for n, lin in linears.items():
        if id(lin.weight) in tied:
            return n
    return logits_layer


def _example_inputs(module: nn.Module, example_inputs) -> tuple[tuple, dict]:
    """The inputs given, or small ones built from the model's config / signature (token ids, pixel values)."""
    if isinstance(example_inputs, dict):
        return (), example_inputs
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[0], (tuple, list))
            and isinstance(example_inputs[1], dict)):
        return tuple(example_inputs[0]), example_inputs[1]  # (args, kwargs)
    if example_inputs is not None:
        return (tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)), {}
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    config = next((m.config for m in module.modules() if hasattr(getattr(m, "config", None), "to_dict")), None)
    params = inspect.signature(module.forward).parameters
    if config is not None and "pixel_values" in params:
        size = config.image_size
        return (), {"pixel_values": torch.randn(2, config.num_channels, size, size, device=device)}
    vocab = _vocab_size(module) or min((m.num_embeddings for m in module.modules() if isinstance(m, nn.Embedding)),
                                       default=None)
    if vocab is None:
        raise ValueError(f"cannot guess example inputs for {type(module).__name__}: pass example_inputs= "
                         "(a tuple of positional inputs or a dict of keyword inputs) to tp_plan_for")
    if config is not None:
        return (), {"input_ids": torch.randint(0, vocab, (2, 8), device=device)}
    required = [p for p in params.values() if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return tuple(torch.randint(0, vocab, (2, 8), device=device) for _ in required), {}


# ---- checks and attribute changes ----------------------------------------------------------------------

def _head_owner(names: dict[str, nn.Module], fqn: str) -> tuple[str, nn.Module] | None:
    parts = fqn.split(".")
    for i in range(len(parts) - 1, 0, -1):
        owner = ".".join(parts[:i])
        m = names.get(owner)
        if m is not None and any(isinstance(getattr(m, a, None), int) for a in (*HEAD_ATTRS[:5], "head_dim")):
            return owner, m
    return None


def _head_dim(owner: nn.Module) -> int | None:
    for attr in ("head_dim", "attention_head_size", "key_value_proj_dim"):
        if isinstance(getattr(owner, attr, None), int):
            return getattr(owner, attr)
    heads = next((getattr(owner, a) for a in HEAD_ATTRS[:5] if isinstance(getattr(owner, a, None), int)), None)
    width = next((getattr(owner, a) for a in ("embed_dim", "inner_dim", "all_head_size")
                  if isinstance(getattr(owner, a, None), int)), None)
    return width // heads if heads and isinstance(width, int) else None


def _validate_and_attributes(module: nn.Module, plan: TPPlan) -> dict[str, dict[str, int]]:
    """Raise on shapes that ``plan.tp_size`` does not divide; return the head attributes to set locally."""
    t = plan.tp_size
    names = dict(module.named_modules())
    owners: dict[str, nn.Module] = {}
    # head counts first: they are the root cause when a width is not divisible either
    def heads_first(fqn: str) -> bool:
        style = plan.styles[fqn]
        return not (style == "mha_heads" or (style.startswith("colwise") and _head_owner(names, fqn)))

    for fqn in sorted(plan.styles, key=heads_first):
        style, m = plan.styles[fqn], names[fqn]
        if style == "mha_heads":
            if m.num_heads % t:
                raise ValueError(f"{fqn}: {m.num_heads} attention heads are not divisible by tensor_parallel_size={t}")
            continue
        if style == "moe_experts":
            down = m.down_proj
            size = down.shape[1] if getattr(m, "is_transposed", False) else down.shape[2]
            if size % t:
                raise ValueError(f"{fqn}: the experts' {size} intermediate features are not divisible by "
                                 f"tensor_parallel_size={t}")
            continue
        if style == "embedding_heads":
            if m.embedding_dim % t:
                raise ValueError(f"{fqn}: {m.embedding_dim} heads are not divisible by tensor_parallel_size={t}")
            continue
        if style == "embedding_vocab" or style == "head_vocab_gather":
            size = m.num_embeddings if isinstance(m, nn.Embedding) else (m.nf if _is_conv1d(m) else m.out_features)
            if size % t:
                raise ValueError(
                    f"{fqn}: vocabulary of {size} is not divisible by tensor_parallel_size={t}. Pad it, e.g. "
                    f"model.resize_token_embeddings(new_size, pad_to_multiple_of={t}) for a transformers model "
                    "(the extra rows are never targets), or use a tensor_parallel_size that divides it.")
            continue
        out_features = m.nf if _is_conv1d(m) else m.out_features
        in_features = m.nx if _is_conv1d(m) else m.in_features
        if style == "rowwise":
            if in_features % t:
                raise ValueError(f"{fqn}: {in_features} input features are not divisible by tensor_parallel_size={t}")
            continue
        parts = plan.fused.get(fqn, 1)
        owner = _head_owner(names, fqn)
        head_dim = _head_dim(owner[1]) if owner else None
        if owner and head_dim:
            heads = out_features // parts // head_dim
            if heads % t:
                kind = "key-value heads" if heads != _query_heads(owner[1]) else "heads"
                raise ValueError(f"{fqn}: {heads} attention {kind} (head_dim {head_dim}) are not divisible by "
                                 f"tensor_parallel_size={t}; choose a tensor_parallel_size that divides {heads}")
            owners[owner[0]] = owner[1]
        elif out_features % (parts * t):
            raise ValueError(f"{fqn}: {out_features} output features are not divisible by tensor_parallel_size={t}")
    attributes = {}
    for fqn, owner in owners.items():
        attrs = {a: getattr(owner, a) // t for a in HEAD_ATTRS if isinstance(getattr(owner, a, None), int)}
        if attrs:
            attributes[fqn] = attrs
    return attributes


def _query_heads(m: nn.Module) -> int | None:
    for source in (m, getattr(m, "config", None)):
        for attr in ("num_heads", "num_attention_heads", "n_head", "n_heads"):
            if isinstance(getattr(source, attr, None), int):
                return getattr(source, attr)
    return None
