"""Item 5: with DELTA at 40 % of the unmanaged saved bytes, the process's peak resident memory drops.

Each variant runs in a fresh interpreter; its peak RSS (``VmHWM``) is compared. The model is cheap in
FLOPs but saves ~200 MB per step, so the difference is unambiguous. ``MALLOC_MMAP_THRESHOLD_`` pins glibc's
mmap threshold (it otherwise rises to the size of the first freed 4 MiB block, after which freed blocks stay
in the heap and RSS shows the heap's high-water mark instead of live memory; the measured drop is then
about half as large).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from torch import nn

    import lightning_merak.memory  # imported by every variant, so only the managed step differs

    torch.manual_seed(0)
    WIDTH, ROWS, BLOCKS = 1024, 1024, 16   # one activation = 4 MiB

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(WIDTH)
            self.scale = nn.Parameter(torch.ones(WIDTH))

        def forward(self, x):
            return x + torch.nn.functional.gelu(self.norm(x)) * self.scale

    model = nn.Sequential(*[Block() for _ in range(BLOCKS)])
    mode = sys.argv[1]
    if mode == "delta":
        from lightning_merak.memory import DeltaScheduler
        saved = float(sys.argv[2])  # from the unmanaged run
        params = sum(p.numel() * 4 for p in model.parameters())
        delta = DeltaScheduler(model, memory_budget=2 * params + int(0.4 * saved), profile_steps=1)
    stats = []
    for step in range(3):
        x = torch.randn(ROWS, WIDTH, requires_grad=True)
        if mode == "delta":
            with delta.forward():
                loss = model(x).square().mean()
        else:
            loss = model(x).square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if mode == "delta":
            stats.append(delta.end_step())
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so a child forked from a large pytest
    # process would report the parent's size.
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")]
    maxrss = int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if mode == "none":  # after the peak was read: the saved bytes, measured independently
        from torch.autograd.graph import saved_tensors_hooks
        held = {}
        params = {id(p.untyped_storage()) for p in model.parameters()}
        def pack(t):
            if id(t.untyped_storage()) not in params:
                held[id(t.untyped_storage())] = t.untyped_storage()
            return t
        with saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(ROWS, WIDTH, requires_grad=True)).square().mean()
        stats = sum(s.nbytes() for s in held.values())
    print(json.dumps({"maxrss": maxrss, "stats": stats}))
    """
)


def run_child(*args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="1048576")
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_peak_rss_drops():
    plain = run_child("none")
    saved = plain["stats"]
    assert saved > 150 * 2**20
    managed = run_child("delta", str(saved))
    allowance = int(0.4 * saved)
    assert all(s["delta/peak_bytes"] <= allowance for s in managed["stats"])
    drop = plain["maxrss"] - managed["maxrss"]
    # Most of the released 60 % should show in RSS (transients of the step stay resident in both runs).
    assert drop > 0.4 * saved, (
        f"peak RSS {plain['maxrss'] / 2**20:.0f} MiB -> {managed['maxrss'] / 2**20:.0f} MiB; {managed['stats']}"
    )
