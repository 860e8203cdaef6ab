"""The Slurm scripts: syntax, shellcheck, and the exact per-node commands of their dry run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_t1.launch import dry_run, expand_hostlist, sbatch_header

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh"))
JOBS = [p for p in SCRIPTS if p.name != "common.sh"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Keep the dry run's files (logs, caches) out of the repository."""
    return {
        "T1_LOG_ROOT": str(tmp_path / "logs"),
        "T1_CACHE": str(tmp_path / "cache"),
        "OUTPUT_DIR": str(tmp_path / "runs"),
        **extra,
    }


def test_scripts_exist_and_parse():
    assert {p.name for p in SCRIPTS} == {"common.sh", "rl_32b.sh", "sft_32b.sh", "convert.sh", "eval.sh"}
    for p in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True, check=False)
        assert r.returncode == 0, (p, r.stderr)


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)"
)
def test_shellcheck_clean():
    r = subprocess.run(
        ["shellcheck", "-x", *[str(p.relative_to(ROOT)) for p in SCRIPTS]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_scripts_are_strict_and_never_kill_by_name():
    for p in JOBS:
        text = p.read_text()
        assert "set -euo pipefail" in text, p
        assert text.count("t1_srun ") == 1, f"{p.name}: one srun line"
    for p in SCRIPTS:
        for word in ("pkill", "killall", "kill -9", "xargs kill"):
            assert word not in p.read_text(), (p, word)


def test_long_jobs_requeue_and_append_their_log():
    for name in ("rl_32b.sh", "sft_32b.sh"):
        h = sbatch_header(ROOT / "slurm" / name)
        assert h["nodes"] == "4" and h["gpus-per-node"] == "8" and "time" in h
        assert "requeue" in h and h["signal"].startswith("B:USR1@") and h["open-mode"] == "append"


def test_hostlist_expansion():
    assert expand_hostlist("gpu[001-003,007],login1") == ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]
    assert expand_hostlist("a[1-2]-ib[0-1]") == ["a1-ib0", "a1-ib1", "a2-ib0", "a2-ib1"]
    assert expand_hostlist("node9") == ["node9"]


def test_rl_dry_run_two_nodes_prints_the_torchrun_of_each_node(tmp_path):
    env = _env(
        tmp_path,
        MODEL_DIR="/models/q32",
        SETS="rollout.n_samples=8 run.train_steps=3",
        NCCL_SOCKET_IFNAME="ib0",
    )
    res = dry_run(ROOT / "slurm" / "rl_32b.sh", nodes=2, env=env)
    assert res.returncode == 0, res.output
    assert len(res.srun) == 1
    srun = res.srun[0]
    assert srun[:5] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--label"]
    assert not any(a.startswith("--container") for a in srun)
    log = tmp_path / "logs" / "t1-rl-32b-4242"
    port = 20000 + 4242 % 20000
    for node in (0, 1):
        expected = [
            "torchrun", "--nnodes=2", "--nproc-per-node=8", f"--node-rank={node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=node001:{port}", "--rdzv-id=4242", "--max-restarts=0",
            f"--log-dir={log}/node{node}", "--tee=3", "--local-ranks-filter=0",
            "-m", "megatron_t1", "rl", "--config", "examples/qwen2.5_32b/rl.yaml",
            "--set", "run.name=qwen2.5_32b_t1_rl", "--set", f"run.output_dir={tmp_path / 'runs'}",
            "--set", "model.tokenizer=/models/q32",
            "--set", "rollout.n_samples=8", "--set", "run.train_steps=3",
        ]  # fmt: skip
        assert res.nodes[node] == [expected]
        e = res.node_env[node]
        assert e["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and e["MASTER_ADDR"] == "node001"
        assert e["NCCL_SOCKET_IFNAME"] == "ib0" and e["NCCL_DEBUG"] == "WARN"
        assert e["HF_HOME"] == str(tmp_path / "cache" / "huggingface")
        assert "PYTORCH_CUDA_ALLOC_CONF" not in e  # vLLM's sleep mode forbids expandable segments
    assert res.hosts == {0: "node001", 1: "node002"}


def test_job_folder_records_commit_and_requeue_resumes_the_same_run(tmp_path):
    env = _env(tmp_path)
    first = dry_run(ROOT / "slurm" / "rl_32b.sh", nodes=2, env=env)
    again = dry_run(ROOT / "slurm" / "rl_32b.sh", nodes=2, env=env, restart_count=1)
    assert first.returncode == again.returncode == 0
    assert again.nodes == first.nodes  # same run name and output dir: the trainer resumes from latest
    job = (tmp_path / "logs" / "t1-rl-32b-4242" / "job.txt").read_text()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert f"commit: {head}" in job
    assert "attempt 0" in job and "attempt 1" in job and job.count("exit 0") == 2
    assert (tmp_path / "logs" / "t1-rl-32b-4242" / "env-attempt1.txt").exists()


def test_container_image_runs_srun_in_pyxis(tmp_path):
    env = _env(tmp_path, CONTAINER_IMAGE="/images/t1.sqsh", CONTAINER_MOUNTS="/data:/data")
    res = dry_run(ROOT / "slurm" / "sft_32b.sh", nodes=2, env=env)
    assert res.returncode == 0, res.output
    srun = res.srun[0]
    assert "--container-image=/images/t1.sqsh" in srun
    assert f"--container-mounts={ROOT}:{ROOT},{tmp_path / 'cache'}:{tmp_path / 'cache'},/data:/data" in srun
    assert f"--container-workdir={ROOT}" in srun
    (argv,) = res.nodes[1]
    assert argv[argv.index("-m") + 1 : argv.index("-m") + 3] == ["megatron_t1", "sft"]
    assert res.node_env[1]["CONTAINER"] == "/images/t1.sqsh"
    assert res.node_env[1]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_convert_and_eval_run_one_python_process(tmp_path):
    res = dry_run(ROOT / "slurm" / "convert.sh", env=_env(tmp_path, HF_DIR="/models/q32", OUT="/ckpt/q32"))
    assert res.returncode == 0, res.output
    assert res.nodes == {
        0: [
            [
                "python",
                "tools/convert_ckpt.py",
                "hf-to-mcore",
                "--hf-dir",
                "/models/q32",
                "--out",
                "/ckpt/q32",
                "--tp",
                "8",
                "--pp",
                "2",
                "--no-progress",
            ]
        ]
    }
    back = dry_run(
        ROOT / "slurm" / "convert.sh",
        env=_env(
            tmp_path, DIRECTION="mcore-to-hf", MCORE_DIR="/r/ck", OUT="/x", HF_DIR="/models/q32", DTYPE="bf16"
        ),
    )
    assert back.nodes[0] == [
        [
            "python",
            "tools/convert_ckpt.py",
            "mcore-to-hf",
            "--mcore-dir",
            "/r/ck",
            "--out",
            "/x",
            "--no-progress",
            "--hf-template",
            "/models/q32",
            "--dtype",
            "bf16",
        ]
    ]
    ev = dry_run(ROOT / "slurm" / "eval.sh", env=_env(tmp_path, CKPT="/r/ck"))
    assert ev.returncode == 0, ev.output
    (argv,) = ev.nodes[0]
    assert argv[:6] == ["python", "-m", "megatron_t1", "eval", "--checkpoint", "/r/ck"]
    assert "--benchmarks" in argv and "--data-dir" in argv
    # The command line is one the eval CLI accepts.
    from megatron_t1.__main__ import build_parser

    build_parser().parse_args(argv[3:])


def test_missing_inputs_and_no_slurm_fail_with_a_message(tmp_path):
    res = dry_run(ROOT / "slurm" / "convert.sh", env=_env(tmp_path))
    assert res.returncode != 0 and "set HF_DIR" in res.output and not res.nodes
    ev = dry_run(ROOT / "slurm" / "eval.sh", env=_env(tmp_path))
    assert ev.returncode != 0 and "set CKPT" in ev.output
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(
        ["bash", "slurm/rl_32b.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert r.returncode != 0 and "not inside a Slurm job" in r.stderr


def test_launch_cli_prints_node_commands(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "megatron_t1.launch", "slurm/sft_32b.sh", "--nodes", "2",
         "--env", f"T1_LOG_ROOT={tmp_path}", "--env", f"T1_CACHE={tmp_path}/c"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[node ") and " torchrun " in ln]
    assert [ln.split("]")[0] for ln in lines] == ["[node 0 node001", "[node 1 node002"]
    assert "--node-rank=1" in lines[1] and "--nnodes=2" in lines[0]


def test_usr1_before_the_time_limit_requeues_and_waits_for_srun(tmp_path):
    """sbatch --signal=B:USR1@600 reaches the batch shell while srun runs: it asks Slurm to requeue
    the job and keeps waiting for srun (whose exit status stays the job's)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "srun": "#!/bin/sh\nsleep 1.5\necho srun-finished\nexit 0\n",
        "scontrol": '#!/bin/sh\nif [ "$1" = show ]; then echo node001; else echo "scontrol $*"; fi\n',
    }
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(_env(tmp_path), PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="77", SLURM_NNODES="1",
               SLURM_JOB_NODELIST="node001", SLURM_JOB_NAME="t")  # fmt: skip
    proc = subprocess.Popen(["bash", "slurm/rl_32b.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = 10.0
        job = tmp_path / "logs" / "t-77" / "job.txt"
        while not (job.exists() and "srun:" in job.read_text()) and deadline > 0:
            time.sleep(0.05)
            deadline -= 0.05
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "requeueing job 77" in out and "scontrol requeue 77" in out and "srun-finished" in out
    assert "exit 0" in job.read_text()
