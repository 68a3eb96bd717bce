"""ParallelStyles for column/row-parallel layers with Merak's sub-tensor overlap.

Parameters stay DTensors (so ``get_model_state_dict`` and DCP see original names and full shapes); the forward
runs on ``.tolocal_shard()`` shards inside custom autograd Functions that own the collectives:

- column-parallel: forward needs no communication; backward all-reduces the input gradient.
- row-parallel: forward all-reduces the partial output; backward needs no communication.

With ``chunks = k > 1`` the communicating direction splits the batch (dim 0; the sequence, dim 1, when a
micro-batch has fewer than k samples) into k sub-tensors, starts each chunk's all-reduce asynchronously
(``async_op=True``) and computes the next chunk meanwhile, waiting only before the concatenation (Merak's
sub-pipelined TP, level 1, with k chunks instead of 2). Rows of a matmul are independent, so the result
equals k = 1.
"""

from __future__ import annotations

import math
from types import MethodType

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from lightning_merak._compat import _StridedShard, local_shard, mha_packed_in_projection, parameter_slots
from lightning_merak.tensor_parallel.checkpoint import _checkpoint_as_contiguous_shards


def _split_dim(x: torch.Tensor, k: int) -> int:
    """The batch dimension; the sequence dimension when a micro-batch is smaller than k (pipelines use 1)."""
    return 1 if x.dim() >= 3 and x.shape[0] < k <= x.shape[1] else 0


def _chunked_all_reduce(compute, x: torch.Tensor, k: int, group) -> torch.Tensor:
    """``cat([all_reduce(compute(c)) for c in x.chunk(k)])``, chunk i's all-reduce overlapping chunk i+1's compute.

    ``compute`` acts on the last dimension only, so any split of the others gives the same numbers.
    """
    dim = _split_dim(x, k)
    outs, works = [], []
    for c in x.chunk(max(1, min(k, x.shape[dim])), dim=dim):
        y = compute(c).contiguous()
        works.append(dist.all_reduce(y, group=group, async_op=True))
        outs.append(y)
    for w in works:
        w.wait()
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=dim)


class _ColumnParallelMatmul(torch.autograd.Function):
    """``x @ w`` with ``w`` column-sharded; backward all-reduces ``grad_x`` chunk by chunk, overlapped."""

    @staticmethod
    def forward(ctx, x, w, b, group, k):  # w: (in, out_local)
        ctx.save_for_backward(x, w)
        ctx.group, ctx.k, ctx.has_bias = group, k, b is not None
        y = x.reshape(-1, x.shape[-1]) @ w
        if b is not None:
            y = y + b
        return y.view(*x.shape[:-1], w.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            wt = w.t()
            gx = _chunked_all_reduce(lambda g: g @ wt, gy, ctx.k, ctx.group)
        gy2 = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = x.reshape(-1, x.shape[-1]).t() @ gy2
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(0)
        return gx, gw, gb, None, None


class _RowParallelMatmul(torch.autograd.Function):
    """``all_reduce(x @ w)`` with ``w`` row-sharded; the all-reduce runs per batch chunk, overlapped."""

    @staticmethod
    def forward(ctx, x, w, group, k):  # x: (..., in_local), w: (in_local, out)
        ctx.save_for_backward(x, w)
        return _chunked_all_reduce(lambda c: c @ w, x, k, group)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gx = gw = None
        gy2 = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = (gy2 @ w.t()).view(*x.shape)
        if ctx.needs_input_grad[1]:
            gw = x.reshape(-1, x.shape[-1]).t() @ gy2
        return gx, gw, None, None


def _distribute(module: nn.Module, name: str, mesh: DeviceMesh, placement) -> None:
    param = getattr(module, name, None)
    if param is None or isinstance(param, DTensor):
        return
    module.register_parameter(name, nn.Parameter(distribute_tensor(param.data, mesh, [placement]),
                                                 requires_grad=param.requires_grad))


def _is_conv1d(module: nn.Module) -> bool:
    """HF's ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _weight_in_out(module: nn.Module) -> torch.Tensor:
    """The local weight as (in, out); ``nn.Linear`` stores (out, in), ``Conv1D`` stores (in, out)."""
    w = local_shard(module.weight)
    return w if _is_conv1d(module) else w.t()


class ColumnParallel(ParallelStyle):
    """Output features sharded; ``fused=3`` shards each of q|k|v per head (a strided shard of the fused weight).

    Input: the replicated activation (plain tensor). Output: this rank's slice of the features (plain tensor).
    """

    def __init__(self, chunks: int = 2, fused: int = 1) -> None:
        super().__init__()
        self.chunks, self.fused = chunks, fused

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        out_dim = 1 if _is_conv1d(module) else 0
        weight_pl = Shard(out_dim) if self.fused == 1 else _StridedShard(out_dim, split_factor=self.fused)
        bias_pl = Shard(0) if self.fused == 1 else _StridedShard(0, split_factor=self.fused)
        _distribute(module, "weight", device_mesh, weight_pl)
        _distribute(module, "bias", device_mesh, bias_pl)
        if self.fused > 1:
            _checkpoint_as_contiguous_shards(module, ("weight", "bias"))
        group, k = device_mesh.get_group(), self.chunks

        def forward(self_: nn.Module, x: torch.Tensor) -> torch.Tensor:
            bias = local_shard(self_.bias) if self_.bias is not None else None
            return _ColumnParallelMatmul.apply(x, _weight_in_out(self_), bias, group, k)

        module.forward = MethodType(forward, module)
        return module

    def __repr__(self) -> str:
        return f"ColumnParallel(chunks={self.chunks}, fused={self.fused})"


class RowParallel(ParallelStyle):
    """Input features sharded; the partial outputs are all-reduced (sub-tensor overlapped), then the bias added."""

    def __init__(self, chunks: int = 2) -> None:
        super().__init__()
        self.chunks = chunks

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _distribute(module, "weight", device_mesh, Shard(0 if _is_conv1d(module) else 1))
        _distribute(module, "bias", device_mesh, Replicate())
        group, k = device_mesh.get_group(), self.chunks

        def forward(self_: nn.Module, x: torch.Tensor) -> torch.Tensor:
            y = _RowParallelMatmul.apply(x, _weight_in_out(self_), group, k)
            return y + local_shard(self_.bias) if self_.bias is not None else y

        module.forward = MethodType(forward, module)
        return module

    def __repr__(self) -> str:
        return f"RowParallel(chunks={self.chunks})"


class MultiheadAttentionParallel(ParallelStyle):
    """``nn.MultiheadAttention``: heads split across ranks (column-parallel fused in-projection, row-parallel out).

    ``F.multi_head_attention_forward`` derives the head size from the full ``embed_dim``, so a sharded module
    cannot use it; this style installs an equivalent forward over the local heads (dropout via SDPA).
    """

    def __init__(self, chunks: int = 2) -> None:
        super().__init__()
        self.chunks = chunks

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not mha_packed_in_projection(module) or module.bias_k is not None:
            raise NotImplementedError(f"tensor parallel nn.MultiheadAttention needs kdim == vdim == embed_dim and "
                                      f"add_bias_kv=False; got {module}")
        _distribute(module, "in_proj_weight", device_mesh, _StridedShard(0, split_factor=3))
        _distribute(module, "in_proj_bias", device_mesh, _StridedShard(0, split_factor=3))
        _checkpoint_as_contiguous_shards(module, ("in_proj_weight", "in_proj_bias"))
        RowParallel(self.chunks)._apply(module.out_proj, device_mesh)
        module.local_num_heads = module.num_heads // device_mesh.size()
        group, k = device_mesh.get_group(), self.chunks
        module.forward = MethodType(_make_mha_forward(group, k), module)
        return module

    def __repr__(self) -> str:
        return f"MultiheadAttentionParallel(chunks={self.chunks})"


class _GradAllReduce(torch.autograd.Function):
    """Identity forward; the gradient (a partial sum on each rank) all-reduced: the input of a sharded region."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _AllReduce(torch.autograd.Function):
    """Partial outputs summed over the ranks; the gradient passes unchanged: the output of a sharded region."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.contiguous().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        return g, None


class ExpertsParallel(ParallelStyle):
    """transformers' MoE experts (3-D ``gate_up_proj`` / ``down_proj``, one slice per expert): each expert's MLP split
    by its intermediate features, as a column/row pair (transformers' ``moe_tp_experts``). Routing stays replicated,
    so every rank sends the same tokens to the same experts; the experts' partial outputs are all-reduced.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if getattr(module, "has_bias", False):
            raise NotImplementedError(f"tensor parallel MoE experts with biases are not supported ({type(module).__name__}"
                                      "); use tensor_parallel_size=1 for this model")
        transposed = getattr(module, "is_transposed", False)
        # concatenated [gate; up] rows: each rank takes its part of gate and of up (strided); interleaved pairs split
        gate_up = (_StridedShard(2 if transposed else 1, split_factor=2) if getattr(module, "is_concatenated", True)
                   else Shard(2 if transposed else 1))
        _distribute(module, "gate_up_proj", device_mesh, gate_up)
        _distribute(module, "down_proj", device_mesh, Shard(1 if transposed else 2))
        if isinstance(gate_up, _StridedShard):
            _checkpoint_as_contiguous_shards(module, ("gate_up_proj",))
        group, original = device_mesh.get_group(), module.forward

        def forward(self_: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
            hidden_states = _GradAllReduce.apply(hidden_states, group)
            args = tuple(_GradAllReduce.apply(a, group) if isinstance(a, torch.Tensor) and a.requires_grad else a
                         for a in args)
            kwargs = {k: _GradAllReduce.apply(v, group) if isinstance(v, torch.Tensor) and v.requires_grad else v
                      for k, v in kwargs.items()}
            params = {n: parameter_slots(self_)[n] for n in ("gate_up_proj", "down_proj")}
            try:  # the experts' own forward (eager or grouped_mm) on this rank's slices
                for n, p in params.items():
                    parameter_slots(self_)[n] = local_shard(p)
                out = original(hidden_states, *args, **kwargs)
            finally:
                parameter_slots(self_).update(params)
            return _AllReduce.apply(out, group)

        module.forward = MethodType(forward, module)
        return module

    def __repr__(self) -> str:
        return "ExpertsParallel()"


def _make_mha_forward(group, k: int):
    def forward(self: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        w = local_shard(self.in_proj_weight)
        b = local_shard(self.in_proj_bias) if self.in_proj_bias is not None else None
        wq, wk, wv = w.chunk(3)
        bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
        heads = self.local_num_heads
        head_dim = self.head_dim

        def project(x, w_, b_):
            y = _ColumnParallelMatmul.apply(x, w_.t(), b_, group, k)
            return y.view(*x.shape[:2], heads, head_dim).transpose(1, 2)

        q, kk, v = project(query, wq, bq), project(key, wk, bk), project(value, wv, bv)
        mask = _merge_masks(attn_mask, key_padding_mask, q.dtype)
        causal = is_causal and mask is None
        out = F.scaled_dot_product_attention(q, kk, v, attn_mask=mask, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(*query.shape[:2], heads * head_dim)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    return forward


def _merge_masks(attn_mask, key_padding_mask, dtype) -> torch.Tensor | None:
    """MHA's masks (bool True = masked out, or additive float) as one additive float mask for SDPA."""
    def additive(m):
        if m is None:
            return None
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, -math.inf)
        return m.to(dtype)

    mask = additive(attn_mask)
    if mask is not None and mask.dim() == 3:  # (batch * heads, L, S) is not supported across ranks
        raise NotImplementedError("tensor parallel nn.MultiheadAttention supports 2-D attn_mask only")
    if key_padding_mask is not None:
        kpm = additive(key_padding_mask)[:, None, None, :]
        mask = kpm if mask is None else mask + kpm
    return mask
