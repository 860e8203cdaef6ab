"""The RL command end to end on a tiny random policy: a few steps run with finite metrics, the weights
and the EMA anchor move, the engine stays in parity; a run stopped after each step and restarted
with the same command reproduces the metrics of an uninterrupted run, and so does a run killed with
SIGKILL in the middle of its work; the same run under torchrun with TP=2 (and an engine per rank,
each sampling half the prompts, sequence parallel and the fused output layer on) gives TP=1's first
step (one engine)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.proc import ROOT
from tests.e2e.proc import run_cli as _run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megatron_t1.data.io import write_jsonl_atomic
    from megatron_t1.data.synthetic import make_problems, make_sft_examples
    from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer

    d = tmp_path_factory.mktemp("rldata")
    train_tokenizer(chat_corpus(make_sft_examples(200, seed=5)), 512, d / "tok")
    probs = make_problems(16, seed=5, split="train")
    write_jsonl_atomic(d / "prompts.jsonl", [{"question": p.question, "answer": p.answer} for p in probs])
    return d


def _config(data: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    p = out / "rl.yaml"
    p.write_text(f"""
model: {{num_layers: 2, hidden_size: 64, ffn_hidden_size: 128, num_attention_heads: 4, num_query_groups: 2,
        vocab_size: 512, max_position_embeddings: 256, tokenizer: {data / "tok"}}}
data: {{train_path: {data / "prompts.jsonl"}, seq_length: 96, micro_batch_size: 4, global_batch_size: 8}}
optim: {{lr: 1.0e-3, lr_decay_style: constant}}
rollout: {{prompts_per_step: 2, n_samples: 4, max_new_tokens: 24, temperature: 1.2}}
reward: {{num_workers: 1}}
loss: {{entropy_coef: 0.01}}
anchor: {{ema: 0.9}}
run: {{name: r, output_dir: {out}, train_steps: 2, device: cpu}}
log: {{progress_bar: false}}
""")
    return p


def _metrics(run_dir: Path) -> dict[int, dict]:
    """Step -> metrics; a step logged twice (re-run after a crash) keeps its last record."""
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    cfg = _config(data, out)
    r = _run(_rl_cmd(cfg), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return _metrics(out / "r")


def _rl_cmd(cfg: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "megatron_t1", "rl", "--config", str(cfg)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


KEYS = ("loss", "reward_mean", "kl_anchor", "grad_norm", "response_len")


def test_rl_steps_and_resume(data, full_run, tmp_path):
    full = full_run
    assert sorted(full) == [1, 2]
    for m in full.values():
        for key in ("loss", "reward_mean", "kl_anchor", "m/entropy", "grad_norm"):
            assert m[key] == m[key] and abs(m[key]) < 1e6, key  # finite
        assert m["sync/parity_mean_abs"] < 1e-4
        assert m["grad_norm"] > 0
    # After step 1 the EMA anchor lags the policy: the KL of step 2's rollouts is not zero.
    assert full[1]["kl_anchor"] == pytest.approx(0.0, abs=1e-6)
    assert abs(full[2]["kl_anchor"]) > 1e-7

    cfg = _config(data, tmp_path / "stop")
    cmd = _rl_cmd(cfg, "run.exit_interval=1")
    for _ in range(2):
        r = _run(cmd, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    resumed = _metrics(tmp_path / "stop" / "r")
    assert sorted(resumed) == [1, 2]
    for step in (1, 2):
        for key in KEYS:
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_kill_9_then_same_command_continues(data, full_run, tmp_path):
    """SIGKILL while the first checkpoint is being written (or, if that window is missed, right after
    it): the restarted command ignores any partial checkpoint and ends with the uninterrupted metrics."""
    cfg = _config(data, tmp_path / "kill")
    cmd = _rl_cmd(cfg, "checkpoint.save_interval=1")
    ckpts = tmp_path / "kill" / "r" / "checkpoints"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    r = _run(cmd, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = _metrics(tmp_path / "kill" / "r")
    assert sorted(resumed) == [1, 2]
    for step in (1, 2):
        for key in KEYS:
            assert resumed[step][key] == pytest.approx(full_run[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert not any(p.name.endswith(".tmp") for p in ckpts.iterdir())  # no half-written checkpoint left


@pytest.mark.dist
def test_tp2_under_torchrun_matches_tp1(data, full_run, tmp_path):
    # at TP=2 with the 32B example's training settings: sequence parallel and the fused output layer
    # (the TP=1 run computes logits); the dist tests cover TP=2 without them
    cfg = _config(data, tmp_path / "tp2")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "megatron_t1", "rl", "--config", str(cfg), "--set", "parallel.tensor_model_parallel_size=2",
        "--set", "parallel.sequence_parallel=true", "--set", "loss.fused_output_layer=true",
    ]  # fmt: skip
    r = _run(cmd, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    tp2 = _metrics(tmp_path / "tp2" / "r")
    assert sorted(tp2) == [1, 2]
    # an engine per rank (LOCAL_WORLD_SIZE=2), each sampling half the prompts; one engine at TP=1
    assert {m["rollout/engines"] for m in tp2.values()} == {2.0} and full_run[1]["rollout/engines"] == 1.0
    # step 1: same rollouts (per-prompt seeds, same weights), same loss and gradient up to float error
    for key in KEYS:
        assert tp2[1][key] == pytest.approx(full_run[1][key], rel=1e-4, abs=1e-6), key
    for m in tp2.values():
        for key in ("loss", "reward_mean", "kl_anchor", "m/entropy", "grad_norm", "mismatch_mean"):
            assert m[key] == m[key] and abs(m[key]) < 1e6, key
        assert m["sync/parity_mean_abs"] < 1e-4
    assert abs(tp2[2]["kl_anchor"]) > 1e-7  # the EMA anchor lags the updated policy
    assert (tmp_path / "tp2" / "r" / "hf" / "config.json").is_file()  # final HF export


def test_two_optimizer_steps_per_rollout_batch(data, full_run, tmp_path):
    """loss.optim_steps_per_batch=2: two mini-batches per rollout batch, the second off-policy (clipped
    ratio against the log-probs taken before the first update); the first rollout batch is the same."""
    cfg = _config(data, tmp_path / "mb2")
    cmd = _rl_cmd(cfg, "loss.optim_steps_per_batch=2")
    r = _run(cmd, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = _metrics(tmp_path / "mb2" / "r")
    assert sorted(m) == [1, 2]
    assert m[1]["reward_mean"] == pytest.approx(full_run[1]["reward_mean"])  # same rollouts at step 1
    for s in m.values():
        assert s["m/ratio"] == pytest.approx(1.0, abs=0.2) and 0.0 <= s["m/clip_frac"] <= 1.0
        assert s["loss"] == s["loss"] and s["grad_norm"] > 0
    # two EMA updates after step 1 (not one): the anchor lags less, but still lags
    assert abs(m[2]["kl_anchor"]) > 1e-7
