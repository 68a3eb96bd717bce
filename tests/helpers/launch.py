"""The one launch helper for multi-process tests.

Two ways, both with a free port each, a short gloo timeout and a hard wall-clock limit so a deadlock fails
the test in seconds instead of eating CI's budget:

- ``spawn(fn, world_size, *args)``: ``torch.multiprocessing`` spawn of ``fn(rank, world_size, *args)`` with
  the default process group already initialised (gloo). Returns the list of per-rank return values.
- ``run_script(path, *args, nprocs)``: runs a Lightning script in a fresh interpreter, so that Lightning's
  own subprocess launcher starts the other ranks (``devices=nprocs`` inside the script). Returns the
  completed process; raises with its output on failure or timeout.
"""

from __future__ import annotations

import datetime
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        result = fn(rank, world_size, *args)
        payload = ("ok", result)
    except BaseException:  # report to the parent, which re-raises with the traceback
        payload = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(payload, f)
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def spawn(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return per-rank results."""
    import torch.multiprocessing as mp

    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, out_dir, fn, args), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        for p in procs:
            left = max(0.1, (deadline - datetime.datetime.now()).total_seconds())
            p.join(left)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        results = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} produced no result (hung ranks: {hung}, exit codes: "
                                   f"{[p.exitcode for p in procs]})")
            status, value = pickle.load(open(path, "rb"))
            if status == "error":
                raise RuntimeError(f"rank {r} failed:\n{value}")
            results.append(value)
        if hung:
            raise RuntimeError(f"ranks {hung} did not finish within {timeout}s")
        return results


def run_script(script: str | Path, *args: str, timeout: float = 240.0, env: dict | None = None,
               cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python script args`` (Lightning launches the other ranks); kill the whole group on timeout."""
    full_env = {**os.environ, "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "PL_GLOBAL_SEED"):
        full_env.pop(key, None)
    full_env.update(env or {})
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=full_env, cwd=str(cwd or REPO), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise RuntimeError(f"{script} {' '.join(args)} timed out after {timeout}s; output:\n{out[-6000:]}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stray child ranks
        except ProcessLookupError:
            pass
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, None)
    return result


def check_script(script: str | Path, *args: str, **kwargs) -> str:
    """``run_script`` that raises with the output unless the script exited 0; returns the output."""
    result = run_script(script, *args, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} exited {result.returncode}; output:\n{result.stdout[-8000:]}")
    return result.stdout
