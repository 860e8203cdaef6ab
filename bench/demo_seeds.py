"""Seed x recipe sweep of the demo: how robust is "RL beats SFT" across seeds and RL settings?

Runs ``python -m megatron_t1 demo`` for every (recipe, seed) pair, several at a time (``--jobs``),
each capped to ``--threads`` intra-op threads so that the runs do not spin against each other.
Recipes that share their SFT overrides share the SFT: the first run of a (SFT overrides, seed)
trains it, the others copy its data, checkpoint and export and pass ``--reuse-sft``.

    python bench/demo_seeds.py --seeds 1,2,3 --recipe base= \\
        --recipe n16="rollout.n_samples=16 optim.lr=3e-5" --jobs 2 --threads 1
    python bench/demo_seeds.py --device cuda --tp2-steps 0 --seeds 1,2,3,4,5,6 --jobs 6 ...

A recipe is ``NAME=RL_OVERRIDES`` or ``NAME=RL_OVERRIDES|SFT_OVERRIDES`` (space-separated
``key=value`` items of examples/tiny_cpu/{rl,sft}.yaml; an SFT item ``task.KEY=VALUE`` is passed as
``demo --task-set KEY=VALUE``, e.g. ``task.error_rate=0.4``). Each finished run appends its summary to
``REPORT/results.jsonl``; at the end (or at ``--time-limit``, which stops the runs still going) a
table per recipe: mean and minimum of RL - SFT, and on how many seeds it is >= 3 paired standard
errors. Logs of every run are in ``REPORT/logs``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Job:
    recipe: str
    seed: int
    rl: list[str]
    sft: list[str]
    out: Path
    sft_owner: Job | None = None  # the job that trains this job's SFT (None: this one)
    proc: subprocess.Popen | None = None
    status: str = "waiting"
    log: Path = field(default=Path())
    log_file: object = None  # the open log of the running process


def _parse_recipe(text: str) -> tuple[str, list[str], list[str]]:
    if "=" not in text:
        raise SystemExit(f"--recipe {text!r}: expected NAME=RL_OVERRIDES[|SFT_OVERRIDES]")
    name, spec = text.split("=", 1)
    rl, _, sft = spec.partition("|")
    return name, rl.split(), sft.split()


def _command(job: Job, args, reuse: bool) -> list[str]:
    cmd = [sys.executable, "-m", "megatron_t1", "demo", "--out", str(job.out), "--seed", str(job.seed)]
    cmd += ["--device", args.device, "--threads", str(args.threads), "--tp2-steps", str(args.tp2_steps)]
    cmd += ["--select", args.select]
    if args.heldout:
        cmd += ["--heldout", str(args.heldout)]
    for o in job.rl:
        cmd += ["--rl-set", o]
    for o in job.sft:  # "task.KEY=VALUE" items set the task's SFT traces (demo --task-set)
        cmd += ["--task-set", o[len("task.") :]] if o.startswith("task.") else ["--sft-set", o]
    return cmd + (["--reuse-sft"] if reuse else []) + (["--quick"] if args.quick else [])


def _copy_sft(src: Path, dst: Path) -> None:
    """The SFT stage of a demo folder: the tokenizer (the rest of data/ is rebuilt), sft/, sft_hf/."""
    dst.mkdir(parents=True, exist_ok=True)
    for part in ("data/tokenizer", "sft", "sft_hf"):
        shutil.rmtree(dst / part, ignore_errors=True)
        shutil.copytree(src / part, dst / part)


def _table(rows: list[dict]) -> str:
    lines = [
        "| recipe | seeds | SFT mean | RL mean | RL - SFT mean | min | >= 3 SE | RL s mean |",
        "|---" * 8 + "|",
    ]
    for name in dict.fromkeys(r["recipe"] for r in rows):
        rs = [r for r in rows if r["recipe"] == name]
        d = [100 * r["rl_minus_sft"] for r in rs]
        lines.append(
            f"| {name} | {','.join(str(r['seed']) for r in rs)} "
            f"| {100 * statistics.mean(r['sft_accuracy'] for r in rs):.1f} "
            f"| {100 * statistics.mean(r['rl_accuracy'] for r in rs):.1f} | {statistics.mean(d):+.1f} "
            f"| {min(d):+.1f} | {sum(r['rl_minus_sft_in_stderr'] >= 3 for r in rs)}/{len(rs)} "
            f"| {statistics.mean(r['rl_seconds'] for r in rs):.0f} |"
        )
    return "\n".join(lines)


def run_jobs(jobs: list[Job], args, results: Path) -> list[dict]:
    """Run ``jobs`` (``args.jobs`` at a time, each capped to ``args.threads`` threads; SFT owners first)
    until all end or ``args.time_limit`` passes; each finished run's summary row is appended to
    ``results`` and returned. A job whose ``status`` is already "ok" is not run (a resumed sweep)."""
    t0 = time.time()
    done: list[dict] = []
    while any(j.status in ("waiting", "running") for j in jobs):
        for j in jobs:
            if j.status == "running" and j.proc.poll() is not None:
                j.log_file.close()
                j.status = "ok" if j.proc.returncode == 0 else f"failed ({j.proc.returncode})"
                if j.status == "ok":
                    s = json.loads((j.out / "summary.json").read_text())
                    row = {"recipe": j.recipe, "rl": j.rl, "sft": j.sft, **s}
                    row.pop("scaling", None)
                    done.append(row)
                    with open(results, "a") as f:
                        f.write(json.dumps(row) + "\n")
                print(f"[{time.time() - t0:5.0f}s] {j.recipe} seed {j.seed}: {j.status}", flush=True)
        if args.time_limit and time.time() - t0 > args.time_limit:
            for j in jobs:
                if j.status == "running":
                    j.proc.kill()
                    j.proc.wait()
                    j.log_file.close()
                    j.status = "killed"
                elif j.status == "waiting":
                    j.status = "not started"
            break
        running = sum(j.status == "running" for j in jobs)
        for j in jobs:
            if running >= args.jobs:
                break
            if j.status != "waiting":
                continue
            owner = j.sft_owner
            if owner is not None and owner.status != "ok" and not args.sft_from:
                if owner.status not in ("waiting", "running"):
                    j.status = "skipped (its SFT run failed)"
                continue
            if args.sft_from:
                _copy_sft(Path(args.sft_from.format(seed=j.seed)), j.out)
            elif owner is not None:
                _copy_sft(owner.out, j.out)
            j.log_file = open(j.log, "w")  # noqa: SIM115 (closed when the run ends)
            j.proc = subprocess.Popen(
                _command(j, args, reuse=owner is not None or bool(args.sft_from)),
                stdout=j.log_file,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)),
            )
            j.status = "running"
            running += 1
        time.sleep(2)
    return done


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3", help="comma-separated demo seeds")
    p.add_argument("--recipe", action="append", default=[], help="NAME=RL_OVERRIDES[|SFT_OVERRIDES]")
    p.add_argument("--out", default="runs/seeds", help="parent folder of the runs")
    p.add_argument("--report", default=None, help="where results.jsonl and logs go (default --out)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads per run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tp2-steps", type=int, default=2)
    p.add_argument("--heldout", type=int, default=None)
    p.add_argument(
        "--select",
        choices=("best", "final"),
        default="best",
        help="demo --select: the RL checkpoint with the best validation accuracy (default) or the last",
    )
    p.add_argument("--quick", action="store_true", help="pass --quick to every demo (a smoke test)")
    p.add_argument(
        "--sft-from",
        default=None,
        metavar="PATTERN",
        help="start every run from an existing demo SFT: a folder with data/tokenizer, sft/ and sft_hf/, "
        "'{seed}' replaced by the seed (e.g. runs/demo_s{seed}); recipes' SFT overrides are then ignored",
    )
    p.add_argument("--time-limit", type=float, default=None, help="seconds; stop the runs still going")
    args = p.parse_args()
    recipes = [_parse_recipe(r) for r in (args.recipe or ["base="])]
    seeds = [int(s) for s in args.seeds.split(",")]
    report = Path(args.report or args.out)
    (report / "logs").mkdir(parents=True, exist_ok=True)
    results = report / "results.jsonl"

    jobs: list[Job] = []
    owners: dict[tuple[tuple[str, ...], int], Job] = {}
    for name, rl, sft in recipes:  # recipe-major: every seed's first recipe starts first
        for seed in seeds:
            job = Job(name, seed, rl, sft, Path(args.out) / f"{name}_s{seed}")
            job.log = report / "logs" / f"{name}_s{seed}.log"
            job.sft_owner = owners.setdefault((tuple(sft), seed), job)
            if job.sft_owner is job:
                job.sft_owner = None
            jobs.append(job)

    done = run_jobs(jobs, args, results)
    for j in jobs:
        if j.status != "ok":
            print(f"{j.recipe} seed {j.seed}: {j.status} (log {j.log})")
    if done:
        print(_table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
