"""Proxy graph of the pipelined module: meta-device capture of module-level data flow and costs."""

from lightning_merak.trace.capture import (
    Call,
    Capture,
    CaptureError,
    capture,
    find_units,
    meta_twin,
    shape_signature,
)

__all__ = ["Call", "Capture", "CaptureError", "capture", "find_units", "meta_twin", "shape_signature"]
