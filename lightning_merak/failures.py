"""An exception on one rank ends every rank fast, with the original error printed.

Two cases, two mechanisms:

- **Rank-local sections**: code that runs on some ranks while the others already wait in the collective after
  it (rank 0 writing a checkpoint's ``meta.pt``, rank 0's ``auto`` re-choice, DELTA's budget check on one
  stage). ``rank_local`` and ``agree`` run the section and let the collective that follows carry its result or an
  ``ErrorMarker``; then every rank raises: the failing rank its own exception, the others ``PeerFailure`` with
  the failing rank's error and traceback. Nobody waits for the timeout.
- **Everything else** (an error inside a pipeline schedule while the peer waits in a receive, a rank killed
  outright): the peers' gloo operations fail as soon as the failing process's sockets close. What could keep
  them open is the failing process not ending: after its traceback, Python's exit runs the process groups'
  destructors, which wait out the whole timeout for a collective still in flight (an async all-reduce its peer
  will never join). So a failure in a multi-process run is recorded (``record_failure``, from the strategy's
  ``on_exception``), and once the exception has ended the script (``sys.excepthook``, after the traceback is
  printed) the process leaves at once with exit code 1. A rank killed by a signal closes its sockets too.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

log = logging.getLogger(__name__)

T = TypeVar("T")


class PeerFailure(RuntimeError):
    """Another rank failed in a section this rank was waiting on; the message carries that rank's error."""


@dataclass(frozen=True)
class ErrorMarker:
    """What a collective carries instead of a result when its rank-local section raised."""

    rank: int
    section: str
    error: str  # "ValueError: the message"
    details: str  # the formatted traceback


class _Outcome:
    """A section's result on this rank, or the exception it raised (kept to re-raise with its traceback)."""

    def __init__(self, fn: Callable[[], Any] | None) -> None:
        self.value: Any = None
        self.exception: BaseException | None = None
        if fn is None:
            return
        try:
            self.value = fn()
        except Exception as err:  # noqa: BLE001 - any error of the section is carried to the other ranks
            self.exception = err

    def marker(self, section: str) -> ErrorMarker | None:
        if self.exception is None:
            return None
        err = self.exception
        return ErrorMarker(dist.get_rank() if dist.is_initialized() else 0, section,
                           f"{type(err).__name__}: {err}",
                           "".join(traceback.format_exception(type(err), err, err.__traceback__)))


def _raise_first(outcome: _Outcome, markers: list[ErrorMarker | None]) -> None:
    """Every rank raises when any section failed: this rank's own error first, else the first failing rank's."""
    if outcome.exception is not None:
        raise outcome.exception
    failed = next((m for m in markers if m is not None), None)
    if failed is not None:
        raise PeerFailure(f"rank {failed.rank} failed in {failed.section}, so this rank stops too: {failed.error}\n"
                          f"rank {failed.rank}'s traceback:\n{failed.details}")


def _distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_initialized() and dist.get_world_size(group) > 1


def rank_local(fn: Callable[[], T], section: str, runs: bool, src: int = 0,
               group: dist.ProcessGroup | None = None) -> T | None:
    """Run ``fn`` where ``runs`` (global rank ``src`` must be one of them) and broadcast its result from ``src``
    over ``group``; every rank returns it, or raises if it failed on ``src``. Every rank of ``group`` calls this.
    The broadcast is also the barrier: no rank goes on before ``src`` finished the section."""
    outcome = _Outcome(fn if runs else None)
    if not _distributed(group):
        _raise_first(outcome, [])
        return outcome.value
    box = [outcome.marker(section) or ("ok", outcome.value)] if dist.get_rank() == src else [None]
    dist.broadcast_object_list(box, src=src, group=group)
    received = box[0]
    _raise_first(outcome, [received if isinstance(received, ErrorMarker) else None])
    return received[1]


def agree(fn: Callable[[], T], section: str, group: dist.ProcessGroup | None = None) -> T:
    """Run ``fn`` on every rank of ``group``, then agree: if it raised anywhere, every rank raises (one
    ``all_gather_object`` of the markers). Every rank of ``group`` calls this at the same point."""
    outcome = _Outcome(fn)
    if not _distributed(group):
        _raise_first(outcome, [])
        return outcome.value
    markers: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(markers, outcome.marker(section), group=group)
    _raise_first(outcome, markers)
    return outcome.value


# ------------------------------------------------------------------------------------------- leaving fast
_failed: list[str] = []  # this process's recorded failures (one line each)
_previous_hook: Any = None


def record_failure(exception: BaseException) -> None:
    """A multi-process run failed on this rank: stop the peers waiting on it. Say whether the error is this rank's
    own or a consequence of a peer's, and make the process leave as soon as the exception ends the script."""
    global _previous_hook
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    reason = peer_reason(exception)
    if reason is not None:
        first_line = str(exception).splitlines()[0] if str(exception) else type(exception).__name__
        log.error(f"Merak: rank {rank} stops because {reason}: {first_line}")
    _failed.append(f"rank {rank}: {type(exception).__name__}")
    if _previous_hook is None:
        _previous_hook = sys.excepthook
        sys.excepthook = _leave_after_traceback


def failed() -> bool:
    """Whether a failure was recorded in this process (its process groups may be mid-operation)."""
    return bool(_failed)


def peer_reason(exception: BaseException) -> str | None:
    """Why this rank failed if another rank caused it (a ``PeerFailure``, a communication error), else None."""
    if isinstance(exception, PeerFailure):
        return "a peer rank failed in a section this rank waited on"
    text = str(exception)
    if "Timed out" in text or "timed out" in text:
        return ("a collective with its peers timed out (a peer is stuck, or the ranks called different "
                "collectives)")
    if isinstance(exception, (dist.DistBackendError, dist.DistNetworkError, dist.DistStoreError)) or any(
            s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")):
        return "a peer rank failed or ended first (its error is in that rank's output)"
    return None


def _leave_after_traceback(exc_type: type, exc: BaseException, tb: Any) -> None:
    """``sys.excepthook`` after a recorded failure: print the traceback as usual, flush, and end the process
    without the process-group destructors (they would wait for peers that are gone)."""
    _previous_hook(exc_type, exc, tb)
    try:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(1)
