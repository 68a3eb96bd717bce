"""Swap tiers: where DELTA puts a released storage until backward needs it again.

Two tiers, one interface (``swap_out`` at pack time, ``swap_in`` ahead of use, ``release`` when done):

- :class:`PinnedSwapTier` (CUDA): a pool of pinned host buffers keyed by size (``cudaHostAlloc`` costs
  milliseconds per call, so buffers are reused), copies on one side stream ordered by events. The compute
  stream is captured *before* entering the side-stream context (torchtitan #2581: inside
  ``torch.cuda.stream(s)``, ``current_stream()`` is ``s``).
- :class:`FileSwapTier` (CPU-only runs): an unlinked temporary file written with ``pwrite`` and read back
  with ``pread`` on a prefetch thread. Swapped bytes then live in the kernel's page cache, which is not
  part of the process's resident set, so RSS really drops. (A shared ``mmap`` would count the written
  pages in RSS again, which is why the file is not mapped.) The file goes to ``swap_dir``, by default a
  disk-backed temporary folder (``default_swap_dir``): on a RAM-backed /tmp (tmpfs) the swapped bytes would
  stay in memory.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor

import torch


def storage_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over a whole storage (no copy)."""
    n = storage.nbytes()
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (n,), (1,))


class SwapTier:
    """Interface of a swap tier; see the module docstring."""

    name = "none"
    #: whether swap-out runs concurrently with compute (the director hides it behind forward work)
    write_overlaps = False
    #: whether prefetched swap-ins run beside compute without slowing it (a copy engine, not the CPU cores)
    read_overlaps = False

    def swap_out(self, data: torch.Tensor) -> object:
        """Copy a flat uint8 tensor out; the returned slot identifies the copy."""
        raise NotImplementedError

    def swap_in(self, slot: object) -> object:
        """Start bringing a slot back; the returned object's ``wait()`` gives the flat uint8 tensor."""
        raise NotImplementedError

    def release(self, slot: object) -> None:
        """The slot's bytes are no longer needed."""

    def measure_bandwidth(self, nbytes: int = 32 * 2**20) -> tuple[float, float]:
        """(out, in) bandwidth in bytes/s, timed on real transfers of ``nbytes``."""
        raise NotImplementedError

    def close(self) -> None:
        """Free what the tier holds."""


RAM_FILESYSTEMS = ("tmpfs", "ramfs")


def filesystem_type(path: str | os.PathLike) -> str | None:
    """The type of the file system holding ``path`` ("ext4", "tmpfs", ...), from the longest matching mount
    point in /proc/mounts; None where that is unreadable (not Linux)."""
    try:
        with open("/proc/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best, kind = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")  # /proc/mounts escapes spaces in paths
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def default_swap_dir() -> str:
    """Where the swap file goes when no ``swap_dir`` is given: the system temporary folder (``TMPDIR``) unless it
    is RAM-backed, then ``/var/tmp`` (kept on disk by convention), then ``~/.cache``; the RAM-backed folder only
    if none of those is writable, with a warning (swapping there saves no memory)."""
    temp = tempfile.gettempdir()
    for folder in (temp, "/var/tmp", os.path.join(os.path.expanduser("~"), ".cache")):
        if os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK) \
                and filesystem_type(folder) not in RAM_FILESYSTEMS:
            return folder
    warnings.warn(f"DELTA: the temporary folder {temp} is RAM-backed ({filesystem_type(temp)}) and no disk-backed "
                  "folder was found, so swapped activations stay in memory. Set MerakStrategy(swap_dir=...) to a "
                  "folder on disk.", stacklevel=2)
    return temp


class _Done:
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def wait(self) -> torch.Tensor:
        return self.value


class _FutureRead:
    def __init__(self, future: Future) -> None:
        self.future = future

    def wait(self) -> torch.Tensor:
        return self.future.result()


class FileSwapTier(SwapTier):
    """CPU tier: an unlinked temp file, ``pwrite`` at swap-out, ``pread`` on a prefetch thread."""

    name = "file"
    write_overlaps = False
    read_overlaps = False  # the prefetch thread copies with the same cores the compute uses

    def __init__(self, swap_dir: str | os.PathLike | None = None) -> None:
        self.swap_dir = os.fspath(swap_dir) if swap_dir is not None else default_swap_dir()
        os.makedirs(self.swap_dir, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="delta-swap-", suffix=".bin", dir=self.swap_dir)
        os.unlink(path)  # the file disappears with the process, even after a crash
        self._fd = fd
        self._end = 0
        self._free: dict[int, list[int]] = defaultdict(list)
        self._lock = threading.Lock()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="delta-prefetch")

    def swap_out(self, data: torch.Tensor) -> tuple[int, int]:
        n = data.numel()
        with self._lock:
            offset = self._free[n].pop() if self._free[n] else self._end
            if offset == self._end:
                self._end += n
        view = memoryview(data.numpy())
        done = 0
        while done < n:
            done += os.pwrite(self._fd, view[done:], offset + done)
        return offset, n

    def _read(self, offset: int, n: int) -> torch.Tensor:
        buf = torch.empty(n, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < n:
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"DELTA swap file: short read at offset {offset + done}")
            done += got
        return buf

    def swap_in(self, slot: tuple[int, int], asynchronous: bool = True) -> _FutureRead | _Done:
        if not asynchronous:
            return _Done(self._read(*slot))
        return _FutureRead(self._reader.submit(self._read, *slot))

    def release(self, slot: tuple[int, int]) -> None:
        with self._lock:
            self._free[slot[1]].append(slot[0])

    def measure_bandwidth(self, nbytes: int = 16 * 2**20) -> tuple[float, float]:
        data = torch.ones(nbytes, dtype=torch.uint8)
        t0 = time.perf_counter()
        slot = self.swap_out(data)
        t1 = time.perf_counter()
        self._read(*slot)
        t2 = time.perf_counter()
        self.release(slot)
        return nbytes / max(t1 - t0, 1e-9), nbytes / max(t2 - t1, 1e-9)

    def close(self) -> None:
        self._reader.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _PinnedSlot:
    __slots__ = ("host", "d2h")

    def __init__(self, host: torch.Tensor, d2h: torch.cuda.Event) -> None:
        self.host = host
        self.d2h = d2h


class _PinnedRead:
    def __init__(self, dev: torch.Tensor, h2d: torch.cuda.Event) -> None:
        self.dev = dev
        self.h2d = h2d

    def wait(self) -> torch.Tensor:
        compute = torch.cuda.current_stream(self.dev.device)
        compute.wait_event(self.h2d)
        self.dev.record_stream(compute)  # the side-stream allocation is now used on the compute stream
        return self.dev


class PinnedSwapTier(SwapTier):
    """CUDA tier: pinned host pool keyed by size, one side stream, events for ordering."""

    name = "pinned"
    write_overlaps = True
    read_overlaps = True

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.side = torch.cuda.Stream(self.device)
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)

    def _host(self, n: int) -> torch.Tensor:
        return self._free[n].pop() if self._free[n] else torch.empty(n, dtype=torch.uint8, pin_memory=True)

    def swap_out(self, data: torch.Tensor) -> _PinnedSlot:
        compute = torch.cuda.current_stream(self.device)  # before entering the side stream (torchtitan #2581)
        host = self._host(data.numel())
        self.side.wait_stream(compute)
        with torch.cuda.stream(self.side):
            host.copy_(data, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.side)
        data.record_stream(self.side)  # the device block is not reused before the copy has read it
        return _PinnedSlot(host, done)

    def swap_in(self, slot: _PinnedSlot, asynchronous: bool = True) -> _PinnedRead:
        with torch.cuda.stream(self.side):
            self.side.wait_event(slot.d2h)
            dev = torch.empty(slot.host.numel(), dtype=torch.uint8, device=self.device)
            dev.copy_(slot.host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.side)
        return _PinnedRead(dev, done)

    def release(self, slot: _PinnedSlot) -> None:
        # Safe at once: any later D2H into this buffer is queued on the same side stream, after this H2D.
        self._free[slot.host.numel()].append(slot.host)

    def measure_bandwidth(self, nbytes: int = 64 * 2**20) -> tuple[float, float]:
        dev = torch.ones(nbytes, dtype=torch.uint8, device=self.device)
        host = self._host(nbytes)
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        torch.cuda.synchronize(self.device)
        with torch.cuda.stream(self.side):
            start.record(self.side)
            host.copy_(dev, non_blocking=True)
            mid.record(self.side)
            dev.copy_(host, non_blocking=True)
            end.record(self.side)
        torch.cuda.synchronize(self.device)
        self._free[nbytes].append(host)
        d2h_s = start.elapsed_time(mid) / 1e3
        h2d_s = mid.elapsed_time(end) / 1e3
        return nbytes / max(d2h_s, 1e-9), nbytes / max(h2d_s, 1e-9)

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        self._free.clear()


def make_tier(device: torch.device, swap_dir: str | os.PathLike | None = None) -> SwapTier:
    """The tier for tensors on ``device``: pinned host memory for CUDA, a swap file otherwise."""
    if device.type == "cuda":
        return PinnedSwapTier(device)
    return FileSwapTier(swap_dir)
