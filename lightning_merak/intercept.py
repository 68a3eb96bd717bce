"""The one way this package intercepts a module's forward: the stage dispatch, DELTA and the step takeover.

Several mechanisms wrap the forward of the same module (a transformer block is at once a pipeline unit and a
DELTA recompute segment; the pipelined module is redirected by the takeover while its blocks are dispatched).
Each wrapper names its layer, and wrappers compose in the fixed order of ``LAYERS`` whatever order they were
installed in, so the nesting is a property of the design rather than of statement order. ``remove`` undoes one
wrapper; the module's own forward comes back when the last one goes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

#: Innermost first: the stage runs a block live or as a stub; DELTA manages the saved tensors of what runs;
#: the takeover redirects the pipelined module's outermost call.
LAYERS = ("stage", "memory", "takeover")
_WRAPS = "_merak_forward_wraps"
_BASE = "_merak_forward_base"

Forward = Callable[..., Any]


class ForwardWrap:
    """One installed wrapper; ``remove()`` takes it out again (idempotent)."""

    def __init__(self, module: nn.Module, layer: str, wrapper: Callable[[Forward], Forward]) -> None:
        if layer not in LAYERS:
            raise ValueError(f"unknown forward layer {layer!r}; one of {LAYERS}")
        self.module, self.layer, self.wrapper = module, layer, wrapper

    def remove(self) -> None:
        wraps = self.module.__dict__.get(_WRAPS)
        if wraps is None or self not in wraps:
            return
        wraps.remove(self)
        _compose(self.module)


def wrap_forward(module: nn.Module, layer: str, wrapper: Callable[[Forward], Forward]) -> ForwardWrap:
    """Install ``wrapper(inner) -> forward`` on ``module`` at ``layer``; ``inner`` is what runs below it."""
    wrap = ForwardWrap(module, layer, wrapper)
    if _WRAPS not in module.__dict__:
        # the module's own forward: an instance attribute someone set before us, else the class's method
        object.__setattr__(module, _BASE, module.__dict__.get("forward"))
        object.__setattr__(module, _WRAPS, [])
    module.__dict__[_WRAPS].append(wrap)
    _compose(module)
    return wrap


def _compose(module: nn.Module) -> None:
    wraps = module.__dict__[_WRAPS]
    base = module.__dict__[_BASE]
    if not wraps:
        del module.__dict__[_WRAPS], module.__dict__[_BASE]
        if base is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = base
        return
    forward = base if base is not None else type(module).forward.__get__(module)
    for wrap in sorted(wraps, key=lambda w: LAYERS.index(w.layer)):  # stable: same layer in install order
        forward = wrap.wrapper(forward)
    module.forward = forward
