"""The worker pool never hangs: stuck workers are killed, dead ones replaced, errors contained;
the scorer keeps scoring through both; the package imports without torch, megatron or sympy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from megatron_t1.reward import RewardConfig, RewardScorer, compute_rewards
from megatron_t1.reward.pool import WorkerPool


def _handler(task, cache, context):
    """Test handler, run in the spawned workers (imported there by reference)."""
    kind, arg = task
    if kind == "double":
        return 2 * arg
    if kind == "sleep":  # no timer in this handler: only the parent's wall guard can stop it
        time.sleep(arg)
        return "slept"
    if kind == "spin":  # computing, deaf to everything: what a worker stuck in a C call looks like
        while True:
            pass
    if kind == "die":
        os._exit(3)
    if kind == "raise":
        raise ValueError("boom")
    if kind == "count":
        cache[arg] = cache.get(arg, 0) + 1
        return cache[arg]
    if kind == "context":
        return context
    if kind == "pid":  # busy for a moment, so both workers are at work at once
        time.sleep(arg)
        return os.getpid()
    raise AssertionError(kind)


def _init(value):
    return value


def _failing_init():
    raise RuntimeError("cannot start")


def _pool(**kw) -> WorkerPool:
    kw.setdefault("num_workers", 1)
    kw.setdefault("wall_timeout_s", 0.5)
    return WorkerPool(_handler, init=_init, init_args=("ctx",), **kw)


def test_results_in_order_and_context():
    with _pool(num_workers=2) as pool:
        out = pool.run([("double", i) for i in range(20)] + [("context", None)])
    assert [r.status for r in out] == ["ok"] * 21
    assert [r.value for r in out[:20]] == [2 * i for i in range(20)]
    assert out[20].value == "ctx"


def test_stuck_worker_is_killed_and_queued_tasks_rerun():
    with _pool() as pool:  # one worker, depth 2: "double 1" waits behind the stuck task
        pool.wait_ready()
        start = time.perf_counter()
        out = pool.run([("sleep", 60), ("double", 1), ("double", 2)])
        elapsed = time.perf_counter() - start
        assert [r.status for r in out] == ["timeout", "ok", "ok"]
        assert [r.value for r in out[1:]] == [2, 4]
        assert pool.restarts == 1
        assert elapsed < 20  # 0.5 s guard + one respawn, not 60 s
        assert pool.run([("double", 5)])[0].value == 10  # the replacement works


def test_guard_kills_computing_workers_early_and_idle_ones_at_the_stall_limit():
    """Past the wall guard a worker is killed once it has burnt cpu_timeout_s on the task; one that
    uses no CPU (sleeping here; stopped or blocked in practice) only at the stall guard."""
    with _pool(wall_timeout_s=0.2, cpu_timeout_s=0.1, stall_timeout_s=1.5) as pool:
        pool.wait_ready()
        start = time.perf_counter()
        assert pool.run([("spin", None)])[0].status == "timeout"
        assert time.perf_counter() - start < 1.2
        pool.wait_ready()
        start = time.perf_counter()
        assert pool.run([("sleep", 60)])[0].status == "timeout"
        assert 1.5 <= time.perf_counter() - start < 10


def test_dead_worker_is_replaced():
    with _pool(num_workers=2) as pool:
        out = pool.run([("die", None)] + [("double", i) for i in range(6)])
        assert out[0].status == "died"
        assert [r.value for r in out[1:]] == [2 * i for i in range(6)]
        assert pool.restarts == 1


def test_handler_error_is_contained():
    with _pool() as pool:
        out = pool.run([("raise", None), ("double", 3)])
        assert (out[0].status, out[0].value) == ("error", "ValueError: boom")
        assert out[1].value == 6
        assert pool.restarts == 0


def test_idle_worker_killed_between_runs():
    with _pool(num_workers=2) as pool:
        pool.wait_ready()
        os.kill(pool.pids[0], signal.SIGKILL)
        time.sleep(0.2)
        out = pool.run([("double", i) for i in range(8)])
        assert [r.value for r in out] == [2 * i for i in range(8)]
        assert pool.restarts == 1


def test_groups_stick_to_a_worker():
    """Each worker drains one group (in order) before helping with another's from its end."""
    with _pool(num_workers=2, wall_timeout_s=5.0) as pool:
        pool.wait_ready()
        groups = ["a"] * 8 + ["b"] * 8
        out = pool.run([("pid", 0.05)] * 16, groups=groups)
        pids = [r.value for r in out]
        assert pids[0] != pids[8]
        assert pids[:4] == [pids[0]] * 4 and pids[8:12] == [pids[8]] * 4
        # no group key: plain FIFO over both workers still completes everything
        assert len(pool.run([("pid", 0.0)] * 16)) == 16
        with pytest.raises(ValueError, match="16 tasks but 2 group keys"):
            pool.run([("pid", 0.0)] * 16, groups=["a", "b"])


def test_cache_lives_for_one_scope():
    with _pool() as pool:
        assert [r.value for r in pool.run([("count", "k")] * 2, scope=1)] == [1, 2]
        assert pool.run([("count", "k")], scope=1)[0].value == 3
        assert pool.run([("count", "k")], scope=2)[0].value == 1
        assert pool.run([("count", "k")])[0].value == 1  # None: a fresh cache every run
        assert pool.run([("count", "k")])[0].value == 1


def test_start_failure_raises_and_close_is_idempotent():
    pool = WorkerPool(_handler, num_workers=1, wall_timeout_s=1.0, init=_failing_init)
    with pytest.raises(RuntimeError, match="failed to start"):
        pool.run([("double", 1)])
    pool.close()
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.run([("double", 1)])


def test_handler_from_main_is_refused():
    """Workers never run the calling script, so a handler defined there could not be found."""

    def handler(task, cache, context):
        return task

    handler.__module__ = "__main__"
    with pytest.raises(ValueError, match="defined in __main__"):
        WorkerPool(handler, num_workers=1, wall_timeout_s=1.0)


# --------------------------------------------------------------------------------------------------
# the scorer on top of the pool
# --------------------------------------------------------------------------------------------------

FAST = RewardConfig(timeout_s=0.5, wall_guard_s=1.0, stall_guard_s=1.0)


@pytest.fixture(scope="module")
def scorer():
    """One scorer for the tests below (each waits for replaced workers to be ready first)."""
    with RewardScorer(FAST) as s:
        yield s


def test_scorer_wall_guard_replaces_a_stuck_worker(scorer):
    """A stopped worker is what a worker stuck in a C call looks like from outside: it ignores
    its timer and uses no CPU, so the stall guard takes it. Its current answer scores 0 (timeout);
    everything else is scored normally."""
    scorer.wait_ready()
    os.kill(scorer.worker_pids[0], signal.SIGSTOP)
    batch = scorer.score(["Answer: C"] * 6, ["C"] * 6, truncated=[False] * 6)
    assert batch.reasons == ["timeout"] + ["correct"] * 5
    assert batch.rewards == [0.0] + [1.0] * 5
    assert batch.metrics["reward/timeouts"] == 1
    assert batch.metrics["reward/worker_restarts"] == 1
    again = scorer.score(["\\boxed{0.5}"], ["\\frac12"], truncated=[False])
    assert again.reasons == ["correct"]


def test_scorer_survives_a_worker_dying_mid_answer(scorer):
    """The head answer of a worker that dies scores as worker_died, unless a penalty applies: the
    parent re-runs the detectors itself (the truncated response keeps its -1)."""
    scorer.wait_ready()
    pid = scorer.worker_pids[0]
    os.kill(pid, signal.SIGSTOP)
    threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
    batch = scorer.score(["Answer: C"] * 4 + ["Answer: D"] * 2, ["C"] * 6, truncated=[True] + [False] * 5)
    assert batch.reasons[0] == "overlong" and batch.rewards[0] == -1.0
    assert batch.penalties[0] == ("overlong",)
    assert batch.reasons[1:] == ["correct"] * 3 + ["wrong"] * 2
    assert batch.metrics["reward/worker_restarts"] == 1


def test_scorer_worker_died_reason(scorer):
    scorer.wait_ready()
    pid = scorer.worker_pids[1]
    os.kill(pid, signal.SIGSTOP)
    threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
    batch = scorer.score(["Answer: C"] * 4, ["C"] * 4, truncated=[False] * 4)
    # one group: worker 0 takes answers 0 and 1 from its front, worker 1 helps from its end (3, 2)
    assert batch.reasons == ["correct", "correct", "correct", "worker_died"]


def test_in_process_matches_pool(scorer):
    responses = ["\\boxed{\\frac{1}{2}}", "\\boxed{0.3}", "Answer: B", "", "\\boxed{x=3}"]
    golds = ["0.5", "\\frac13", "B", "1", "3"]
    pooled = scorer.score(responses, golds, truncated=[False] * 5)
    local = compute_rewards(responses, golds, truncated=[False] * 5, config=RewardConfig(num_workers=0))
    assert pooled.rewards == local.rewards == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert pooled.reasons == local.reasons


def test_input_validation():
    scorer_cfg = RewardConfig(num_workers=0)
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        compute_rewards(["a", "b"], ["1"], truncated=[False, False], config=scorer_cfg)
    with pytest.raises(TypeError, match="response 0"):
        compute_rewards([None], ["1"], truncated=[False], config=scorer_cfg)


def test_imports_without_torch_megatron_or_sympy():
    """megatron_t1.reward imports (and scores) with torch, megatron and vllm unimportable; the
    parent process never imports sympy (only the workers do)."""
    code = (
        "import sys\n"
        "for m in ('torch', 'megatron', 'vllm'): sys.modules[m] = None\n"
        "import megatron_t1.reward, megatron_t1.reward.cli, megatron_t1.reward.math_answer\n"
        "from megatron_t1.reward import compute_rewards\n"
        "b = compute_rewards(['so \\\\boxed{4}', 'no'], ['4', '4'], truncated=[False, False])\n"
        "assert b.rewards == [1.0, 0.0], b\n"
        "assert 'sympy' not in sys.modules and 'torch' not in [k for k, v in sys.modules.items() if v]\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


UNGUARDED = """\
from megatron_t1.reward import RewardConfig, compute_rewards

print("top level")
batch = compute_rewards(["so \\\\boxed{4}", "no"], ["4", "4"], truncated=[False, False],
                        config=RewardConfig(num_workers=1))
print("rewards", batch.rewards)
"""


@pytest.mark.parametrize("how", ["path", "module", "stdin"])
def test_script_without_main_guard(tmp_path, how):
    """A script that scores at top level, with no ``if __name__ == "__main__":`` guard, works run as
    a file, as ``-m`` or from stdin: the workers do not re-run it (under multiprocessing's spawn each
    worker re-ran it and the pool failed with "reward worker failed to start")."""
    (tmp_path / "unguarded.py").write_text(UNGUARDED)
    args = {"path": [str(tmp_path / "unguarded.py")], "module": ["-m", "unguarded"], "stdin": ["-"]}[how]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(
        [sys.executable, *args],
        input=UNGUARDED if how == "stdin" else None,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["top level", "rewards [1.0, 0.0]"]
