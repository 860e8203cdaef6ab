"""Run a CLI command the way the end-to-end tests need: from the repository root, one OpenMP thread,
in its own process group so that on timeout the whole group (torchrun's workers included) is killed
and a hung collective cannot outlive the test."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cli(args, *, timeout: float = 240, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"timed out after {timeout}s: {' '.join(map(str, args))}\n{err[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)
