"""The SFT command end to end through the real CLI: resume continues the same loss curve, torchrun
with TP=2 trains the same model, and bad input fails with one clear line and nothing half-written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.e2e.proc import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megatron_t1.data.synthetic import make_sft_examples
    from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer

    d = tmp_path_factory.mktemp("sftdata")
    ex = make_sft_examples(300, seed=3)
    with open(d / "train.jsonl", "w") as f:
        for e in ex:
            f.write(json.dumps(e) + "\n")
    train_tokenizer(chat_corpus(ex), 512, d / "tok")
    return d


def _config(data: Path, out: Path, **extra) -> Path:
    text = f"""
model: {{num_layers: 2, hidden_size: 64, ffn_hidden_size: 128, num_attention_heads: 4, num_query_groups: 2,
        vocab_size: 512, max_position_embeddings: 256, tokenizer: {data / "tok"}}}
data: {{train_path: {data / "train.jsonl"}, seq_length: 128, micro_batch_size: 2, global_batch_size: 4}}
optim: {{lr: 2.0e-3, lr_warmup_steps: 1}}
run: {{name: r, output_dir: {out}, train_steps: 6, device: cpu}}
checkpoint: {{save_interval: 3}}
log: {{progress_bar: false}}
"""
    p = out / "sft.yaml"
    out.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def _run(args, env_extra=None, timeout=240):
    return run_cli(args, timeout=timeout, env_extra=env_extra)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_resume_continues_the_same_loss_curve(data, tmp_path):
    full = _config(data, tmp_path / "full")
    r = _run([sys.executable, "-m", "megatron_t1", "sft", "--config", str(full)])
    assert r.returncode == 0, r.stderr[-3000:]
    straight = _losses(tmp_path / "full" / "r")
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]

    stop = _config(data, tmp_path / "stop")
    cmd = [sys.executable, "-m", "megatron_t1", "sft", "--config", str(stop), "--set", "run.exit_interval=3"]
    r1 = _run(cmd)
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert sorted(_losses(tmp_path / "stop" / "r")) == [1, 2, 3]
    r2 = _run(cmd)  # the same command again resumes from step 3
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "resuming at step 3" in r2.stdout
    resumed = _losses(tmp_path / "stop" / "r")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step
    assert straight[6] < straight[1]  # it learns
    ck = tmp_path / "stop" / "r" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_0000006"
    assert not list(ck.glob("*.tmp"))
    saved = (tmp_path / "stop" / "r" / "config.yaml").read_text()
    assert "exit_interval: 3" in saved


def test_torchrun_tp2_matches_tp1(data, tmp_path):
    base = _config(data, tmp_path / "tp1")
    r = _run(
        [
            sys.executable,
            "-m",
            "megatron_t1",
            "sft",
            "--config",
            str(base),
            "--set",
            "run.train_steps=2",
            "--set",
            "checkpoint.save_interval=0",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    tp2 = _config(data, tmp_path / "tp2")
    r = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "megatron_t1",
            "sft",
            "--config",
            str(tp2),
            "--set",
            "run.train_steps=2",
            "--set",
            "checkpoint.save_interval=0",
            "--set",
            "parallel.tensor_model_parallel_size=2",
        ],
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(tmp_path / "tp1" / "r"), _losses(tmp_path / "tp2" / "r")
    for step in (1, 2):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_corrupt_dataset_line_names_file_and_line(data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = (data / "train.jsonl").read_text().splitlines()
    bad.write_text("\n".join(good[:4] + ['{"messages": [oops'] + good[4:8]) + "\n")
    cfg = _config(data, tmp_path / "bad")
    r = _run(
        [sys.executable, "-m", "megatron_t1", "sft", "--config", str(cfg), "--set", f"data.train_path={bad}"]
    )
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and f"{bad}:5" in last, last
    assert not (tmp_path / "bad" / "r" / "checkpoints").exists()


def test_missing_or_partial_checkpoint(data, tmp_path):
    cfg = _config(data, tmp_path / "m")
    r = _run(
        [
            sys.executable,
            "-m",
            "megatron_t1",
            "sft",
            "--config",
            str(cfg),
            "--set",
            f"checkpoint.init_from={tmp_path / 'nowhere'}",
        ]
    )
    assert r.returncode == 2 and "nowhere" in r.stderr.strip().splitlines()[-1]
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "common.pt").write_bytes(b"")
    r = _run(
        [
            sys.executable,
            "-m",
            "megatron_t1",
            "sft",
            "--config",
            str(cfg),
            "--set",
            f"checkpoint.init_from={partial}",
        ]
    )
    assert r.returncode == 2 and "not a complete" in r.stderr.strip().splitlines()[-1]
