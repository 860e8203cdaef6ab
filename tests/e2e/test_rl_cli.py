"""The RL command end to end on a tiny random policy: a few steps run with finite metrics, the weights
and the EMA anchor move, the engine stays in parity; a run stopped after each step and restarted
with the same command reproduces the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

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
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_rl_steps_and_resume(data, tmp_path):
    cfg = _config(data, tmp_path / "full")
    r = _run([sys.executable, "-m", "megatron_t1", "rl", "--config", str(cfg)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    full = _metrics(tmp_path / "full" / "r")
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
    cmd = [sys.executable, "-m", "megatron_t1", "rl", "--config", str(cfg), "--set", "run.exit_interval=1"]
    for _ in range(2):
        r = _run(cmd, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    resumed = _metrics(tmp_path / "stop" / "r")
    assert sorted(resumed) == [1, 2]
    for step in (1, 2):
        for key in ("loss", "reward_mean", "kl_anchor", "grad_norm", "response_len"):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-7), (step, key)
