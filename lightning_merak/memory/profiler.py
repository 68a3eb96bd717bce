"""What DELTA measures on its profiling steps, and where its recompute segments are.

A profiled forward is a list of storages saved for backward (:class:`PoolInfo`: bytes, the segments it was
saved in, pack and first-unpack time) and of segment calls (:class:`SegmentInfo`: forward time, inputs, the
enclosing call). Segments nest: a repeated block is a segment, and so is each module inside it, so that the
planner can recompute a whole layer or only the part of it that is cheap per byte (a GELU, an attention core).
Keys are positions in the forward's pack order, which is deterministic for a given input signature, so a
plan made from one profiled forward applies to the next ones with the same shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

SegmentKey = tuple[int, int]  # (segment index, call ordinal within the forward)


@dataclass
class PoolInfo:
    """One saved storage (alias pool)."""

    key: int
    nbytes: int
    segment: SegmentKey | None  # the innermost segment call it was first saved in
    t_pack: float  # compute time at pack: swap time of the profiling step already taken out
    t_unpack: float | None = None
    t_last_unpack: float | None = None  # its last use in backward: autograd frees it soon after
    releasable: bool = True
    # innermost segment calls (None: outside any) it was saved in again; a replay of a segment frees the
    # storage only if every save lies inside it
    saved_again_in: list[SegmentKey | None] = field(default_factory=list)

    @property
    def lifetime(self) -> float:
        return 0.0 if self.t_unpack is None else max(self.t_unpack - self.t_pack, 0.0)


@dataclass
class SegmentInfo:
    """One call of a recompute segment."""

    key: SegmentKey
    parent: SegmentKey | None = None  # the enclosing segment call
    seconds: float = 0.0
    input_keys: list[int] = field(default_factory=list)  # pools made before the call that it takes as input
    inner_input_keys: list[int] = field(default_factory=list)  # pools of its inputs first saved inside it


@dataclass
class ForwardProfile:
    """Everything measured about one forward and its backward."""

    pools: dict[int, PoolInfo] = field(default_factory=dict)
    segments: dict[SegmentKey, SegmentInfo] = field(default_factory=dict)
    unpack_order: list[int] = field(default_factory=list)
    t_start: float = 0.0
    t_forward_end: float = 0.0
    t_backward_start: float | None = None
    t_backward_end: float | None = None
    swap_seconds: float = 0.0  # host time spent in swap-outs (the profiling step swaps every candidate)
    swap_bytes: int = 0
    read_seconds: float = 0.0  # host time spent waiting for swap-ins in backward
    read_bytes: int = 0

    @property
    def forward_seconds(self) -> float:
        return max(self.t_forward_end - self.t_start - self.swap_seconds, 1e-9)

    @property
    def backward_seconds(self) -> float:
        if self.t_backward_start is None or self.t_backward_end is None:
            return self.forward_seconds * 2
        return max(self.t_backward_end - self.t_backward_start - self.read_seconds, 1e-9)

    def within(self, inner: SegmentKey | None, outer: SegmentKey) -> bool:
        """Whether segment call ``inner`` is ``outer`` or nested in it."""
        while inner is not None:
            if inner == outer:
                return True
            inner = self.segments[inner].parent
        return False

    def segment_bytes(self, key: SegmentKey) -> int:
        """Bytes first saved inside a segment call (nested calls included), its own inputs too: what it needs
        at once in backward."""
        return sum(p.nbytes for p in self.pools.values() if self.within(p.segment, key))


def find_segments(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers: the innermost repeated blocks (elements of a ModuleList/Sequential).

    GPT-2 and BERT give their transformer layers, ResNet its conv-norm-activation layers. A block qualifies
    when it holds parameters and no repeated blocks of its own, so segments never nest.
    """

    def repeated(m: nn.Module) -> list[tuple[str, nn.Module]]:
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2:
            return [(n, c) for n, c in m.named_children() if any(True for _ in c.parameters())]
        return []

    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, m: nn.Module) -> bool:
        """Collect segments under ``m``; return whether any were found."""
        any_found = False
        for name, child in m.named_children():
            full = f"{prefix}{name}"
            blocks = repeated(child)
            if blocks:
                for bname, block in blocks:
                    if not visit(f"{full}.{bname}.", block):
                        found.append((f"{full}.{bname}", block))
                any_found = True
            elif visit(f"{full}.", child):
                any_found = True
        return any_found

    visit("", module)
    return found


def segment_tree(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every recompute unit: the layers of :func:`find_segments`, then every module inside each layer.

    Recomputing a whole layer frees all it saves but re-runs all of it; a module inside it (GPT-2's GELU
    saves four 4h-wide tensors and costs a few elementwise ops) can free many bytes for little time. Which
    ones are worth it is the planner's choice from measured costs, not a list of module types.
    """
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    layers = find_segments(module)
    for name, layer in layers:
        out.append((name, layer))
        seen.add(id(layer))
    for name, layer in layers:
        for sub, m in layer.named_modules(prefix=name):
            if id(m) not in seen:
                seen.add(id(m))
                out.append((sub, m))
    return out
