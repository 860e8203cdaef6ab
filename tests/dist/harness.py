"""Run a function on N real gloo ranks (spawned processes) with a hard timeout.

gloo hangs instead of failing, so every run has a wall-clock limit after which the ranks are
killed and the test fails with the ranks' exit codes. Results come back through files (one pickle
per rank), so a rank that dies cannot wedge a queue.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from pathlib import Path

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    try:
        result = fn(rank, world, *args)
        payload = {"ok": True, "result": result}
    except BaseException:  # report everything, including assertion errors, to the parent
        payload = {"ok": False, "error": traceback.format_exc()}
    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(payload, f)


def run_ranks(fn, world: int = 2, *, args: tuple = (), timeout: float = 240.0) -> list:
    """Start ``world`` ranks running ``fn(rank, world, *args)``; return their results in rank order."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_entry, args=(r, world, port, out_dir, fn, args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
            p.join()
        if alive:
            raise TimeoutError(f"{len(alive)} of {world} ranks still running after {timeout:.0f}s (killed)")
        results = []
        for r in range(world):
            f = Path(out_dir) / f"rank{r}.pkl"
            if not f.exists():
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            payload = pickle.loads(f.read_bytes())
            if not payload["ok"]:
                raise AssertionError(f"rank {r} failed:\n{payload['error']}")
            results.append(payload["result"])
        return results
