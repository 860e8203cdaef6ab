"""A small process pool that never hangs: per-task wall-clock guard, stuck or dead workers replaced.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot kill one stuck worker (a worker stuck
in a C call holds its task forever) and a worker that dies breaks the whole executor. Here every
worker has its own pipe, the parent knows which task each worker is on, since when, and how much
CPU the worker had used when it started it, and

* a task still running ``wall_timeout_s`` after it reached the head of its worker's queue gets
  status ``"timeout"`` (its worker is killed and a fresh one started) once its worker has used
  more than ``cpu_timeout_s`` of CPU on it (stuck computing: a C call that ignores the worker's
  own timer), or, past ``stall_timeout_s``, once its worker used no CPU for a second (stopped or
  blocked). Looking at CPU, not only at the clock, keeps a slow but honest task on an overloaded
  machine from being killed: its reward does not depend on the load;
* a worker that dies (segfault, OOM kill) gives its current task status ``"died"`` and is
  replaced; tasks queued behind it go back to the pending queue;
* a task whose handler raises gets status ``"error"`` (the worker survives).

Each worker runs ``handler(task, cache, context)`` one task at a time, where ``context`` is what
``init(*init_args)`` returned at start-up and ``cache`` is the worker's scratch dict for one
``scope`` (the scorer keeps each parsed reference answer there for one batch; it is emptied when a
run with another scope starts). Up to ``depth`` tasks are queued per worker, so a worker does not
idle while the parent reads its last result.

Tasks may carry a group key (the scorer groups the responses of one prompt): a worker sticks to
one group until it is drained and then takes a group no other worker is on, so the tasks of a group
share that worker's caches (the reference parsed once, each distinct answer string parsed once);
only at the tail of a run does an idle worker take tasks from the end of another worker's group.

Workers are fresh interpreters started with :mod:`subprocess` (``python -c`` running
:func:`_worker_main`, the parent's ``sys.path`` sent first), not with multiprocessing: no fork of a
parent holding threads, CUDA or locks, and, unlike the ``spawn`` start method (whose
``spawn.prepare`` re-runs the caller's ``__main__`` script as ``__mp_main__`` in every child), the
caller's script is never re-run. So a script needs no ``if __name__ == "__main__":`` guard, and its
own imports (torch, say) are not repeated in each worker. The price: ``handler`` and ``init`` must
live in an importable module, not in ``__main__``. Use the pool as a context manager, or call
:meth:`close` (workers left running are killed at interpreter exit).
"""

from __future__ import annotations

import multiprocessing.connection as mpc
import os
import socket
import subprocess
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from typing import Any

__all__ = ["TaskResult", "WorkerPool"]


@dataclass(frozen=True)
class TaskResult:
    """Outcome of one task: ``status`` in {ok, timeout, died, error}; ``value`` the handler's
    return value when ok, the exception text when error, None otherwise."""

    status: str
    value: Any = None


# What a worker runs (``python -c``). Ctrl-C is the parent's to handle: ignored first, before the
# imports. sys.path comes first, so that the handler's module imports as it does in the parent.
_BOOTSTRAP = """\
import signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
from multiprocessing.connection import Connection
conn = Connection({fd})
sys.path[:] = conn.recv()
from megatron_t1.reward.pool import _worker_main
_worker_main(conn, *conn.recv())
"""


def _worker_main(conn: mpc.Connection, handler: Callable, init: Callable | None, init_args: tuple) -> None:
    """Loop of a worker process: reads ``(scope, index, task)`` messages until None or EOF."""
    context = init(*init_args) if init is not None else None
    conn.send(("ready", os.getpid(), time.process_time()))
    cache: dict = {}
    current_scope = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        scope, index, task = msg
        if scope != current_scope:
            cache.clear()
            current_scope = scope
        try:
            out = ("ok", handler(task, cache, context))
        except Exception as e:  # a bug in one task must not take the worker down
            out = ("error", f"{type(e).__name__}: {e}")
        conn.send(("result", index, *out, time.process_time()))  # CPU now = CPU at the next start


_NO_GROUP = object()


def _process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` from /proc (None where that is unavailable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


class _Pending:
    """Tasks not sent yet, in per-group FIFO queues (see the module docstring for the policy)."""

    def __init__(self, n: int, groups: Sequence[Hashable] | None) -> None:
        self._group_of = list(groups) if groups is not None else [None] * n
        if len(self._group_of) != n:
            raise ValueError(f"WorkerPool.run: {n} tasks but {len(self._group_of)} group keys")
        self._queues: dict[Hashable, deque] = {}
        for index, group in enumerate(self._group_of):
            self._queues.setdefault(group, deque()).append(index)
        self.count = n

    def __bool__(self) -> bool:
        return self.count > 0

    def take(self, current: Hashable, busy: set) -> tuple[int, Hashable]:
        """Next task for a worker on group ``current``, while other workers are on ``busy``.

        Empty queues are dropped, so finding a free group scans at most ``len(busy) + 1`` keys.
        """
        queue = self._queues.get(current)
        if queue:
            index = queue.popleft()
        else:
            free = next((g for g in self._queues if g not in busy), _NO_GROUP)
            if free is not _NO_GROUP:
                current = free
                index = self._queues[current].popleft()
            else:  # the tail of a run: help the worker that has the most left, from the end
                current = max(self._queues, key=lambda g: len(self._queues[g]))
                index = self._queues[current].pop()
        if not self._queues[current]:
            del self._queues[current]
        self.count -= 1
        return index, current

    def put_back(self, index: int) -> None:
        self._queues.setdefault(self._group_of[index], deque()).appendleft(index)
        self.count += 1


class _Process:
    """One worker process, with the part of ``multiprocessing.Process``'s interface the pool uses.

    ``conn``: the parent's end of a socket pair whose other end the worker reads. ``sentinel``: a
    pipe whose write end only the worker holds, readable (EOF) once it is gone (as in
    multiprocessing).
    """

    def __init__(self, handler: Callable, init: Callable | None, init_args: tuple) -> None:
        payload = ForkingPickler.dumps((handler, init, init_args))  # fails here, before a start
        ours, theirs = socket.socketpair()
        for sock in (ours, theirs):
            sock.setblocking(True)  # as multiprocessing.Pipe: a global socket timeout must not apply
        sentinel, alive_w = os.pipe()
        try:
            self._popen = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP.format(fd=theirs.fileno())],
                pass_fds=(theirs.fileno(), alive_w),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            os.close(sentinel)
            raise
        finally:
            theirs.close()
            os.close(alive_w)
        self.pid = self._popen.pid
        self.sentinel = sentinel
        self.conn = mpc.Connection(ours.detach())
        try:  # small messages: they wait in the socket buffer while the worker starts
            self.conn.send(list(sys.path))
            self.conn.send_bytes(payload)
        except OSError:
            pass  # it died at once: the pool finds it dead before it is ready and raises

    @property
    def exitcode(self) -> int | None:
        """None while running; negative: killed by that signal."""
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def kill(self) -> None:
        if self._popen.poll() is None:
            self._popen.kill()

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Close the parent's descriptors (after the process is gone)."""
        self.conn.close()
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


def _kill_all(slots: list) -> None:
    """Kill and reap every worker of a pool (its :meth:`WorkerPool.close`, or interpreter exit)."""
    for slot in slots:
        slot.proc.kill()
    for slot in slots:
        slot.proc.join(timeout=5)
        slot.proc.close()


@dataclass
class _Slot:
    proc: _Process
    conn: mpc.Connection
    ready: bool = False
    spawned_at: float = 0.0
    queue: deque = field(default_factory=deque)  # task indices sent, oldest first
    head_since: float = 0.0  # when queue[0] became the task the worker is on
    cpu_at_head: float = 0.0  # the worker's process CPU time (s) when it started queue[0]
    cpu_seen: tuple | None = None  # (when, CPU) of the last look at a task past the stall guard
    broken: bool = False  # a send failed: the worker is gone, handled once its pipe is drained
    group: Hashable = None  # the group this worker is draining


class WorkerPool:
    """``num_workers`` worker processes running ``handler``; see the module docstring.

    Args:
        handler: module-level function ``(task, cache: dict, context) -> value`` of an importable
            module, not ``__main__`` (picklable by reference). It must bound its own work where it
            can (the scorer arms SIGPROF); the wall guard is the backstop.
        num_workers: processes (>= 1).
        wall_timeout_s: wall seconds a task may run before its worker may be killed.
        cpu_timeout_s: ... and the CPU seconds the worker must also have spent on it (None: wall
            time alone decides; also the fallback where /proc cannot be read).
        stall_timeout_s: wall seconds after which a task's worker is killed if it used no CPU
            for a second (default 10 x wall_timeout_s).
        start_timeout_s: seconds a new worker may take to send "ready" (imports + ``init``).
        init, init_args: module-level ``init(*init_args) -> context`` run once per worker (the
            same rule as ``handler``; ``init_args`` are pickled).
        depth: tasks queued per worker (>= 1).
    """

    def __init__(
        self,
        handler: Callable,
        *,
        num_workers: int,
        wall_timeout_s: float,
        cpu_timeout_s: float | None = None,
        stall_timeout_s: float | None = None,
        start_timeout_s: float = 120.0,
        init: Callable | None = None,
        init_args: tuple = (),
        depth: int = 2,
    ) -> None:
        if num_workers < 1 or depth < 1 or wall_timeout_s <= 0:
            raise ValueError(
                f"WorkerPool: need num_workers >= 1, depth >= 1, wall_timeout_s > 0; got "
                f"{num_workers}, {depth}, {wall_timeout_s}"
            )
        for what, fn in (("handler", handler), ("init", init)):
            if fn is not None and getattr(fn, "__module__", None) == "__main__":
                raise ValueError(
                    f"WorkerPool: {what} {getattr(fn, '__qualname__', fn)!r} is defined in __main__; "
                    "workers do not run the calling script, so define it in an importable module"
                )
        self._handler, self._init, self._init_args = handler, init, init_args
        self.wall_timeout_s = wall_timeout_s
        self.cpu_timeout_s = cpu_timeout_s
        self.stall_timeout_s = stall_timeout_s if stall_timeout_s is not None else 10 * wall_timeout_s
        self.start_timeout_s = start_timeout_s
        self.depth = depth
        self.restarts = 0
        """Workers replaced so far (killed when stuck, or found dead)."""
        self._closed = False
        self._fresh = 0
        self._slots: list[_Slot] = []
        self._finalizer = weakref.finalize(self, _kill_all, self._slots)  # the same list, kept updated
        self._slots.extend(self._spawn() for _ in range(num_workers))

    # ---------------------------------------------------------------------------------------------
    def _spawn(self) -> _Slot:
        proc = _Process(self._handler, self._init, self._init_args)
        return _Slot(proc=proc, conn=proc.conn, spawned_at=time.monotonic())

    def _kill(self, slot: _Slot) -> None:
        slot.proc.kill()  # SIGKILL: a worker stuck in C ignores anything gentler
        slot.proc.join(timeout=5)
        slot.proc.close()

    def _replace(self, i: int, pending: _Pending) -> None:
        """Kill slot i, give its queued tasks (not the head, already resolved) back, respawn."""
        slot = self._slots[i]
        for index in reversed(slot.queue):
            pending.put_back(index)
        slot.queue.clear()
        self._kill(slot)
        self.restarts += 1
        self._slots[i] = self._spawn()

    def wait_ready(self) -> None:
        """Block until every worker finished start-up (optional: :meth:`run` waits as needed)."""
        while not all(s.ready for s in self._slots):
            self._wait_and_collect([], _Pending(0, None))

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers (tests kill one to check recovery)."""
        return [s.proc.pid for s in self._slots]

    # ---------------------------------------------------------------------------------------------
    def run(
        self, tasks: Sequence[Any], scope: Hashable = None, groups: Sequence[Hashable] | None = None
    ) -> list[TaskResult]:
        """Run ``tasks``; results in task order. Workers keep their cache while ``scope`` stays
        the same from one run to the next (None: a fresh cache every run). ``groups[i]``: the
        group of task i (tasks of a group go to one worker, in order, as far as possible).

        Blocks at most about ``len(tasks) / num_workers * wall_timeout_s`` (plus start-up of
        replaced workers); never forever.
        """
        if self._closed:
            raise RuntimeError("WorkerPool is closed")
        if scope is None:
            self._fresh += 1
            scope = ("fresh", self._fresh)
        results: list[TaskResult | None] = [None] * len(tasks)
        pending = _Pending(len(tasks), groups)
        for slot in self._slots:  # group keys of an earlier run mean nothing in this one
            slot.group = None
        remaining = len(tasks)
        while remaining > 0:
            now = time.monotonic()
            for slot in self._slots:
                if slot.ready and not slot.broken and pending and len(slot.queue) < self.depth:
                    self._feed(slot, tasks, scope, pending, now)
            remaining -= self._wait_and_collect(results, pending)
        return results  # type: ignore[return-value]

    def _feed(self, slot: _Slot, tasks: Sequence, scope: Hashable, pending: _Pending, now: float) -> None:
        """Send tasks to ``slot`` up to ``depth``. A broken pipe marks the slot: the death is
        handled after its pipe is drained (a result may have arrived before it died)."""
        busy = {s.group for s in self._slots if s is not slot}  # owned until drained (or the owner dies)
        while pending and len(slot.queue) < self.depth:
            index, slot.group = pending.take(slot.group, busy)
            try:
                slot.conn.send((scope, index, tasks[index]))
            except (BrokenPipeError, ConnectionResetError, OSError):
                pending.put_back(index)
                slot.broken = True
                return
            if not slot.queue:
                slot.head_since, slot.cpu_seen = now, None
            slot.queue.append(index)

    def _on_death(self, i: int, results: list, pending: _Pending) -> int:
        """Worker i is gone: its head task died with it; the rest are re-queued. Returns 1 or 0."""
        slot = self._slots[i]
        done = 0
        if slot.queue:
            results[slot.queue.popleft()] = TaskResult("died")
            done = 1
        self._replace(i, pending)
        return done

    def _wait_and_collect(self, results: list, pending: _Pending) -> int:
        """Wait for messages, deaths or the nearest deadline; returns how many tasks completed."""
        now = time.monotonic()
        deadlines = []
        for slot in self._slots:
            if not slot.ready:
                deadlines.append(slot.spawned_at + self.start_timeout_s)
            elif slot.queue:
                wall_deadline = slot.head_since + self.wall_timeout_s
                # past the wall guard but not proven stuck: look again shortly
                deadlines.append(wall_deadline if now < wall_deadline else now + 0.1)
        timeout = max(0.0, min(deadlines) - now) if deadlines else 0.0
        waitables = [s.conn for s in self._slots] + [s.proc.sentinel for s in self._slots]
        mpc.wait(waitables, timeout=timeout)
        done = 0
        now = time.monotonic()
        for i, slot in enumerate(self._slots):
            alive = True
            try:
                while slot.conn.poll():
                    msg = slot.conn.recv()
                    if msg[0] == "ready":
                        slot.ready = True
                        slot.cpu_at_head = msg[2]
                    else:
                        _, index, status, value, cpu = msg
                        if slot.queue and slot.queue[0] == index:
                            slot.queue.popleft()
                            slot.head_since, slot.cpu_at_head, slot.cpu_seen = now, cpu, None
                            results[index] = TaskResult(status, value)
                            done += 1
            except (EOFError, OSError):
                alive = False
            if not alive or slot.broken or not slot.proc.is_alive():
                if not slot.ready:  # dying during start-up is a set-up error: respawning would loop
                    slot.proc.join(timeout=5)
                    raise RuntimeError(
                        f"reward worker failed to start (exit code {slot.proc.exitcode}); "
                        "see its traceback above"
                    )
                done += self._on_death(i, results, pending)
            elif not slot.ready and now - slot.spawned_at > self.start_timeout_s:
                raise RuntimeError(f"reward worker did not start within {self.start_timeout_s:.0f} s")
            elif slot.queue and self._stuck(slot, now):
                results[slot.queue.popleft()] = TaskResult("timeout")
                done += 1
                self._replace(i, pending)
        return done

    def _stuck(self, slot: _Slot, now: float) -> bool:
        """The wall guard: the head task has overrun (see the module docstring)."""
        wall = now - slot.head_since
        if wall <= self.wall_timeout_s:
            return False
        cpu = _process_cpu(slot.proc.pid) if self.cpu_timeout_s is not None else None
        if cpu is None or cpu - slot.cpu_at_head > self.cpu_timeout_s:
            return True  # computing past its budget (or no way to tell: the clock decides)
        if wall <= self.stall_timeout_s:
            return False
        if slot.cpu_seen is not None and now - slot.cpu_seen[0] >= 1.0:
            if cpu <= slot.cpu_seen[1]:
                return True  # no CPU for a second: stopped or blocked
            slot.cpu_seen = None
        if slot.cpu_seen is None:
            slot.cpu_seen = (now, cpu)
        return False

    # ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers (a polite None, then SIGKILL for any that do not exit within 1 s)."""
        if self._closed:
            return
        self._closed = True
        for slot in self._slots:
            try:
                slot.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 1.0
        for slot in self._slots:
            slot.proc.join(timeout=max(0.0, deadline - time.monotonic()))
        self._finalizer()  # kills whatever is left, reaps all, closes the descriptors

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
