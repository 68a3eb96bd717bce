"""What DELTA measures on its profiling steps, and where its recompute segments are.

A profiled forward is a list of storages saved for backward (:class:`PoolInfo`: bytes, the segment it was
made in, pack and first-unpack time) and of segment calls (:class:`SegmentInfo`: forward time, inputs).
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
    segment: SegmentKey | None
    t_pack: float
    t_unpack: float | None = None
    releasable: bool = True
    escapes: bool = False  # saved again after its segment returned (kept even if the segment is replayed)

    @property
    def lifetime(self) -> float:
        return 0.0 if self.t_unpack is None else max(self.t_unpack - self.t_pack, 0.0)


@dataclass
class SegmentInfo:
    """One call of a recompute segment."""

    key: SegmentKey
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
    swap_seconds: float = 0.0

    @property
    def forward_seconds(self) -> float:
        return max(self.t_forward_end - self.t_start - self.swap_seconds, 1e-9)

    @property
    def backward_seconds(self) -> float:
        if self.t_backward_start is None or self.t_backward_end is None:
            return self.forward_seconds * 2
        return max(self.t_backward_end - self.t_backward_start, 1e-9)

    def segment_bytes(self, key: SegmentKey) -> int:
        """Bytes saved inside a segment call, its own inputs included: what it needs at once in backward."""
        return sum(p.nbytes for p in self.pools.values() if p.segment == key)


def find_segments(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The recompute units: the innermost repeated blocks (elements of a ModuleList/Sequential).

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
