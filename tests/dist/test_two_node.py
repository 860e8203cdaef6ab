"""A real two-node rendezvous on one machine, started with the exact commands slurm/sft_32b.sh gives.

The dry run (``megatron_t1.launch``) of slurm/sft_32b.sh for 2 nodes x 1 GPU prints the torchrun
command of each node; here both run for real on loopback (torchrun as ``python -m
torch.distributed.run``), each agent one rank, TP=2 across the two "nodes", 2 SFT steps of a tiny
model. Their losses must equal a single-process TP=1 run of the same config (rel 1e-5).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_t1.launch import dry_run
from tests.dist.harness import free_port

pytestmark = [pytest.mark.dist, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parents[2]


def _tiny_setup(tmp: Path) -> Path:
    from megatron_t1.data.synthetic import make_sft_examples
    from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer

    ex = make_sft_examples(48, seed=5)
    with open(tmp / "train.jsonl", "w") as f:
        for e in ex:
            f.write(json.dumps(e) + "\n")
    train_tokenizer(chat_corpus(ex), 512, tmp / "tok")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(
        f"""
model: {{num_layers: 2, hidden_size: 64, ffn_hidden_size: 128, num_attention_heads: 4, num_query_groups: 2,
        vocab_size: 512, max_position_embeddings: 256, tokenizer: {tmp / "tok"}}}
data: {{train_path: {tmp / "train.jsonl"}, seq_length: 128, micro_batch_size: 2, global_batch_size: 4}}
optim: {{lr: 2.0e-3, lr_warmup_steps: 1}}
run: {{name: r, train_steps: 2, device: cpu}}
checkpoint: {{save_interval: 0}}
log: {{progress_bar: false, tensorboard: false}}
"""
    )
    return cfg


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A process in its own session (its group is killed on timeout), output to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        for name, p in procs.items():
            rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert rc == 0, f"{name} exited {rc}:\n{logs[name].read_text()[-3000:]}"
    except subprocess.TimeoutExpired:
        raise AssertionError(
            "timed out:\n" + "\n".join(f"--- {n}\n{logs[n].read_text()[-1500:]}" for n in procs)
        ) from None
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_two_torchrun_agents_tp2_match_single_process(tmp_path):
    cfg = _tiny_setup(tmp_path)
    out = tmp_path / "runs"
    port = free_port()
    res = dry_run(
        ROOT / "slurm" / "sft_32b.sh",
        nodes=2,
        gpus_per_node=1,
        env={
            "CONFIG": str(cfg),
            "RUN_NAME": "two_node",
            "OUTPUT_DIR": str(out),
            "T1_LOG_ROOT": str(tmp_path / "logs"),
            "T1_CACHE": str(tmp_path / "cache"),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "SETS": "parallel.tensor_model_parallel_size=2",
            "OMP_NUM_THREADS": "1",
        },
    )
    assert res.returncode == 0, res.output
    assert sorted(res.nodes) == [0, 1]

    base_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs, logs = {}, {}
    for node in (0, 1):
        (argv,) = res.nodes[node]
        assert argv[0] == "torchrun" and f"--node-rank={node}" in argv
        assert f"--rdzv-endpoint=127.0.0.1:{port}" in argv
        logs[f"node{node}"] = tmp_path / f"node{node}.log"
        env = dict(base_env, **res.node_env[node])
        procs[f"node{node}"] = _start(
            [sys.executable, "-m", "torch.distributed.run", *argv[1:]], env, logs[f"node{node}"]
        )
    # The single-process reference runs at the same time (2 cores: three small ranks share them).
    logs["single"] = tmp_path / "single.log"
    procs["single"] = _start(
        [
            sys.executable,
            "-m",
            "megatron_t1",
            "sft",
            "--config",
            str(cfg),
            "--set",
            "run.name=single",
            "--set",
            f"run.output_dir={out}",
        ],
        base_env,
        logs["single"],
    )
    _wait_all(procs, logs, timeout=120)

    two, one = _losses(out / "two_node"), _losses(out / "single")
    assert sorted(two) == sorted(one) == [1, 2]
    for step in (1, 2):
        assert two[step] == pytest.approx(one[step], rel=1e-5), (step, two, one)
    saved = (out / "two_node" / "config.yaml").read_text()
    assert "tensor_model_parallel_size: 2" in saved
    # torchrun kept each node's rank log in the job's log folder (--log-dir, --tee); the c10d
    # rendezvous decides which node holds global rank 0, the one that logs steps
    logs = [next((tmp_path / "logs").glob(f"*/node{node}/*/attempt_0/0/stdout.log")) for node in (0, 1)]
    assert "step 2: loss=" in "".join(log.read_text() for log in logs)
