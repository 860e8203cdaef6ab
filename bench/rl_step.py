"""Time per T1 RL step on the tiny CPU model, broken into its phases, and the share of padding.

    python bench/rl_step.py [--steps 8] [--init-from runs/demo/sft/checkpoints] [--threads 2]

Runs ``python -m megatron_t1 rl`` with ``examples/tiny_cpu/rl.yaml`` (16 prompts x 8 samples, up to
384 new tokens, seq 512, micro-batch 4) in a scratch folder, then reads its metrics.jsonl and prints
the median of each phase over the steps after the first (the first includes warm-up):

    rollout (HF generate on rank 0), reward (math-verify pool), logprob (policy + anchor forward),
    train (forward + backward + Adam), sync (weights -> engine + parity probe), eval, checkpoint

and the padding of the packed micro-batches (``pad_frac``) next to what one response per padded row
would cost (``1 - tokens / (responses x seq_length)``). Needs the demo's data and tokenizer
(``python -m megatron_t1 demo`` once, or pass ``--data``/``--tokenizer``); without ``--init-from`` the
policy is a fresh random model (shorter, garbage responses: the timings then say little).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("rollout_s", "reward_s", "logprob_s", "train_s", "sync_s", "eval_s", "ckpt_s", "step_time_s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="RL steps to time (default 8)")
    ap.add_argument("--init-from", default="runs/demo/sft/checkpoints", help="SFT checkpoint to start from")
    ap.add_argument("--data", default="runs/demo/data/rl_prompts.jsonl", help="RL prompt set")
    ap.add_argument("--tokenizer", default="runs/demo/data/tokenizer", help="tokenizer folder")
    ap.add_argument(
        "--heldout", default="runs/demo/data/heldout.jsonl", help="held-out set for the eval phase"
    )
    ap.add_argument("--eval-every", type=int, default=4, help="held-out eval every N steps (0: none)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (OMP_NUM_THREADS)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = ap.parse_args()
    for p in (args.data, args.tokenizer):
        if not Path(p).exists():
            sys.exit(f"{p} not found: run `python -m megatron_t1 demo` once, or pass --data / --tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        sets = [
            f"run.output_dir={tmp}",
            "run.name=bench",
            f"run.train_steps={args.steps}",
            f"data.train_path={args.data}",
            f"model.tokenizer={args.tokenizer}",
            f"checkpoint.save_interval={max(args.steps // 2, 1)}",
            "log.progress_bar=false",
        ]
        if args.init_from and Path(args.init_from).exists():
            sets.append(f"checkpoint.init_from={args.init_from}")
        else:
            sets.append("checkpoint.init_from=null")
        if args.eval_every and Path(args.heldout).exists():
            sets += [f"eval.heldout_path={args.heldout}", f"eval.eval_every={args.eval_every}"]
        cmd = [sys.executable, "-m", "megatron_t1", "rl", "--config", str(ROOT / "examples/tiny_cpu/rl.yaml")]
        for s in sets + args.set:
            cmd += ["--set", s]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.stderr.write(r.stderr[-4000:])
            return r.returncode
        rows = [json.loads(line) for line in (Path(tmp) / "bench" / "metrics.jsonl").read_text().splitlines()]
        cfg = (Path(tmp) / "bench" / "config.yaml").read_text()
    steps = [r for r in rows if r["step"] >= 2]  # step 0 is the initial eval, step 1 includes warm-up
    seq = next(int(line.split(":")[1]) for line in cfg.splitlines() if line.strip().startswith("seq_length:"))
    print(f"{len(steps)} steps timed (after the first); medians, seconds")
    print("| phase | median s | share of step |")
    print("|---|---|---|")
    periodic = ("eval_s", "ckpt_s")
    plain = [r for r in steps if not any(r.get(ph) for ph in periodic)] or steps
    total = statistics.median(r["step_time_s"] for r in plain)
    for ph in PHASES:
        rows_ph = [r[ph] for r in steps if r.get(ph)] if ph in periodic else [r.get(ph, 0.0) for r in plain]
        if rows_ph and ph != "step_time_s":
            med = statistics.median(rows_ph)
            note = " (when it runs)" if ph in periodic else f" | {med / total:.0%}"
            print(f"| {ph[:-2]} | {med:.2f}{note} |")
    print(f"| step without eval/checkpoint | {total:.2f} | |")
    pad = statistics.median(r["pad_frac"] for r in steps)
    resp = statistics.median(r["response_len"] for r in steps)
    tok_s = statistics.median(r.get("tokens_per_s", 0.0) for r in steps)
    print(f"\npadding of the packed micro-batches: {pad:.1%} (median); mean response {resp:.0f} tokens")
    print(f"one response per padded row of {seq} would be ~{1 - (resp + 40) / seq:.0%} padding (prompt ~40)")
    print(f"trained response tokens per second of step: {tok_s:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
