"""The one-command CPU demo (``make demo`` / ``python -m megatron_t1 demo``): T1 end to end, small.

1. Build the synthetic arithmetic task: SFT traces in T1's trial-and-error style, RL prompts,
   held-out problems, and a byte-level BPE tokenizer trained on them (nothing is downloaded).
2. SFT a tiny policy with Megatron-Core on CPU (``examples/tiny_cpu/sft.yaml``); export it as an HF
   folder with the converter.
3. T1 RL from the SFT checkpoint (``examples/tiny_cpu/rl.yaml``): the transformers rollout engine,
   rule rewards, RLOO with the KL to an EMA anchor, entropy bonus. Most steps run at TP=1 in this
   process; the last ``tp2_steps`` resume the same run under ``torchrun`` with TP=2 over two gloo
   processes (the checkpoint is resharded on load), which then exports the final policy.
   Model selection (``select="best"``): every 5 steps the run evaluates its policy greedily on 2000
   validation problems (disjoint from the held-out test problems) and keeps that checkpoint; the best
   one is the RL policy evaluated below (``select="final"``: the last step's).
4. Evaluate SFT and RL policies on the held-out problems (greedy, scored by T1's reward) and run
   the inference-scaling sweep on the first 1000 of them (thinking cut at each budget, the policy
   summarises): table + PNG.
5. Write ``summary.json``: ``sft_accuracy``, ``rl_accuracy``, their standard errors, the paired
   standard error of the difference, ``heldout_size``, the validation curve and the selected step,
   per-stage and total ``wall_seconds``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from megatron_t1.atomic import atomic_dir, write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
SFT_EXAMPLE = ROOT / "examples" / "tiny_cpu" / "sft.yaml"
RL_EXAMPLE = ROOT / "examples" / "tiny_cpu" / "rl.yaml"
N_RL_PROMPTS = 4000
BUDGETS = (16, 32, 64, 128, 256)
# The inference-scaling sweep runs on the first SCALING_PROBLEMS held-out problems (its curve needs
# no more); the greedy accuracy of SFT and RL covers all of them.
SCALING_PROBLEMS = 1000
# Model selection of the RL policy (select="best"): greedy accuracy on VALIDATION_PROBLEMS problems of
# the held-out split that follow the test problems (so disjoint from them), every SELECT_EVERY steps.
VALIDATION_PROBLEMS = 2000
SELECT_EVERY = 5
# Options of the SFT traces (megatron_t1.data.synthetic.make_sft_examples) that `demo --task-set` sets.
TRACE_OPTIONS = {"error_rate": float, "truncated_fraction": float, "restate": bool}


def build_task(
    data_dir: Path,
    *,
    seed: int,
    n_train: int,
    n_heldout: int,
    vocab_size: int,
    n_validation: int = 0,
    difficulty: dict | None = None,
    trace: dict | None = None,
) -> dict:
    """Write sft_train.jsonl, rl_prompts.jsonl, heldout.jsonl, validation.jsonl and tokenizer/.

    The held-out (test) and validation problems are one draw of the held-out split, cut in two: the
    test problems do not depend on ``n_validation``, and no question is in both.
    ``trace`` holds options of the SFT traces (:data:`TRACE_OPTIONS`, e.g. ``error_rate``).
    """
    from megatron_t1.data.io import write_jsonl_atomic
    from megatron_t1.data.synthetic import make_problems, make_sft_examples
    from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer

    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "train": data_dir / "sft_train.jsonl",
        "rl": data_dir / "rl_prompts.jsonl",
        "heldout": data_dir / "heldout.jsonl",
        "validation": data_dir / "validation.jsonl",
        "tokenizer": data_dir / "tokenizer",
    }
    difficulty = difficulty or {}
    unknown = sorted(set(trace or {}) - set(TRACE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown trace option(s) {unknown}: expected some of {list(TRACE_OPTIONS)}")
    examples = make_sft_examples(n_train, seed, **difficulty, **(trace or {}))
    heldout = make_problems(n_heldout + n_validation, seed, "heldout", **difficulty)
    heldout, validation = heldout[:n_heldout], heldout[n_heldout:]
    rl = make_problems(
        N_RL_PROMPTS, seed + 1, "train", **difficulty
    )  # another draw than the SFT traces' problems
    write_jsonl_atomic(paths["train"], examples)
    write_jsonl_atomic(paths["rl"], [{"question": p.question, "answer": p.answer} for p in rl])
    write_jsonl_atomic(
        paths["heldout"],
        [{"id": f"h{i}", "question": p.question, "answer": p.answer} for i, p in enumerate(heldout)],
    )
    write_jsonl_atomic(
        paths["validation"],
        [{"id": f"v{i}", "question": p.question, "answer": p.answer} for i, p in enumerate(validation)],
    )
    if not (paths["tokenizer"] / "tokenizer.json").exists():
        with atomic_dir(paths["tokenizer"], replace=True) as tmp:
            train_tokenizer(chat_corpus(examples), vocab_size, tmp)
    return paths


def parse_trace_options(items: list[str] | None) -> dict:
    """``["error_rate=0.5", "restate=false"]`` -> ``{"error_rate": 0.5, "restate": False}``.

    Raises :class:`~megatron_t1.config.ConfigError` (a ValueError; one line on the command line).
    """
    from megatron_t1.config import ConfigError

    out: dict = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or key not in TRACE_OPTIONS:
            raise ConfigError(
                f"--task-set {item!r}: expected KEY=VALUE with KEY one of {list(TRACE_OPTIONS)}"
            )
        kind = TRACE_OPTIONS[key]
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"--task-set {item!r}: {key} takes true or false")
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                out[key] = kind(value)
            except ValueError:
                raise ConfigError(f"--task-set {item!r}: {key} takes a {kind.__name__}") from None
    return out


def paired_difference(sft: dict[str, float], rl: dict[str, float]) -> tuple[float, float]:
    """(mean of rl - sft, its standard error) over the problems both evaluated (per-problem scores)."""
    ids = sorted(set(sft) & set(rl))
    d = [rl[i] - sft[i] for i in ids]
    if len(d) < 2:
        return float("nan"), float("nan")
    m = sum(d) / len(d)
    var = sum((x - m) ** 2 for x in d) / (len(d) - 1)
    return m, math.sqrt(var / len(d))


def _per_problem(responses: Path, label: str) -> dict[str, float]:
    scores: dict[str, list[float]] = {}
    for line in responses.read_text().splitlines():
        r = json.loads(line)
        if r["checkpoint"] == label:
            scores.setdefault(r["problem_id"], []).append(float(r["correct"]))
    return {k: sum(v) / len(v) for k, v in scores.items()}


def _validation_curve(metrics: Path) -> dict[int, float]:
    """Step -> held-out (here: validation) accuracy the RL run logged (its last record per step)."""
    curve: dict[int, float] = {}
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "heldout_accuracy" in r and r["step"] > 0:
            curve[int(r["step"])] = float(r["heldout_accuracy"])
    return curve


def _rl_tp2(out: Path, steps: int, log, threads: int | None = None) -> None:
    """Resume the RL run for its last steps with TP=2 over two local processes (torchrun)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "megatron_t1",
        "rl",
        "--config",
        str(out / "rl" / "config.yaml"),
        "--set",
        "parallel.tensor_model_parallel_size=2",
        "--set",
        "run.exit_interval=null",
    ]
    log(f"[demo] RL: last {steps} steps with TP=2 over 2 processes: {' '.join(cmd[2:])}")
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (threads or 2) // 2)))
    r = subprocess.run(cmd, env=env, cwd=os.getcwd())
    if r.returncode != 0:
        raise RuntimeError(f"the TP=2 phase of the RL run failed (exit code {r.returncode}); see above")


def run_demo(
    out_dir: str = "runs/demo",
    *,
    seed: int = 1234,
    quick: bool = False,
    tp2_steps: int = 2,
    reuse_sft: bool = False,
    rl_overrides: list[str] | None = None,
    sft_overrides: list[str] | None = None,
    task_overrides: list[str] | None = None,
    heldout_size: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
    select: str = "best",
    log=print,
) -> dict:
    """Run the demo end to end; returns (and writes) the summary.

    ``device="cuda"`` runs SFT, RL and evaluation on the GPU (seed sweeps in minutes; the TP=2 phase
    needs ``tp2_steps=0`` or two GPUs). ``threads`` caps torch's intra-op threads (default: every
    core), so that several demos can share a many-core box without their threads spinning on each
    other. ``task_overrides`` (``KEY=VALUE``, :data:`TRACE_OPTIONS`) change the SFT traces of the
    task, e.g. ``error_rate=0.4``. ``heldout_size`` overrides the SFT example's ``eval.heldout_size`` (8000).
    ``select``: ``"best"`` evaluates the RL checkpoint with the best validation accuracy (every
    :data:`SELECT_EVERY` steps, on :data:`VALIDATION_PROBLEMS` problems disjoint from the held-out
    ones), ``"final"`` the last step's policy.
    """
    import torch

    from megatron_t1.config import load_config
    from megatron_t1.eval.cli import run_eval
    from megatron_t1.eval.loaders import load_problems
    from megatron_t1.mcore.checkpoint import best_checkpoint, read_metadata
    from megatron_t1.mcore.parallel import destroy_parallel
    from megatron_t1.reward import RewardConfig
    from megatron_t1.train.rl import export_hf, run_rl
    from megatron_t1.train.sft import run_sft

    t0 = time.perf_counter()
    if select not in ("best", "final"):
        raise ValueError(f"select={select!r}: expected 'best' or 'final'")
    trace = parse_trace_options(task_overrides)
    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
    if device != "cpu" and tp2_steps > 0 and torch.cuda.device_count() < 2:
        raise ValueError(
            f"demo --device {device}: the TP=2 phase needs 2 GPUs, this machine has "
            f"{torch.cuda.device_count()}; pass --tp2-steps 0"
        )
    out = Path(out_dir)
    sft_base, rl_base = load_config(SFT_EXAMPLE), load_config(RL_EXAMPLE)
    heldout_size = heldout_size or (100 if quick else sft_base.eval.heldout_size)
    n_val = (16 if quick else VALIDATION_PROBLEMS) if select == "best" else 0
    paths = build_task(
        out / "data",
        seed=seed,
        n_train=sft_base.data.global_batch_size * 50 if quick else 12000,
        n_heldout=heldout_size,
        n_validation=n_val,
        vocab_size=sft_base.model.vocab_size,
        trace=trace,
    )
    log(f"[demo] task: {paths['train']}, {paths['rl']}, {heldout_size} held-out problems")
    common = [
        f"run.output_dir={out}",
        f"run.seed={seed}",
        f"data.seed={seed}",
        f"model.tokenizer={paths['tokenizer']}",
        f"run.device={device}",
    ]
    times: dict[str, float] = {}

    # -- SFT ----------------------------------------------------------------------------------------
    t = time.perf_counter()
    sft_hf = out / "sft_hf"
    reuse = (
        reuse_sft
        and (out / "sft" / "checkpoints" / "latest").is_file()
        and (sft_hf / "config.json").is_file()
    )
    sft_cfg = load_config(
        SFT_EXAMPLE,
        [*common, "run.name=sft", f"data.train_path={paths['train']}"]
        + (["run.train_steps=20"] if quick else [])
        + list(sft_overrides or []),
    )
    if reuse:
        sft = {"final_loss": float("nan")}
        log(f"[demo] reusing the SFT checkpoint in {out / 'sft'} (--reuse-sft)")
    else:
        sft = run_sft(sft_cfg)
        destroy_parallel()
        export_hf(sft_cfg, out / "sft" / "checkpoints", sft_hf)  # the RL run's export, tokenizer included
        log(f"[demo] SFT done in {time.perf_counter() - t:.0f}s (final loss {sft['final_loss']:.4f})")
    times["sft_seconds"] = time.perf_counter() - t

    # -- RL: TP=1 in this process, then the last steps at TP=2 ----------------------------------------
    t = time.perf_counter()
    rl_over = [
        *common,
        "run.name=rl",
        f"data.train_path={paths['rl']}",
        f"checkpoint.init_from={out / 'sft' / 'checkpoints'}",
        "checkpoint.save_interval=0",
    ]
    if quick:
        rl_over += [
            "run.train_steps=3",
            "rollout.prompts_per_step=4",
            "rollout.max_new_tokens=64",
            "data.seq_length=192",
        ]
    if select == "best":
        rl_over += [
            f"eval.heldout_path={paths['validation']}",
            f"eval.heldout_size={n_val}",
            f"eval.eval_every={1 if quick else SELECT_EVERY}",
            "eval.eval_at_start=false",
            "checkpoint.keep_best=true",
        ] + (["eval.max_new_tokens=64"] if quick else [])
    rl_over += list(rl_overrides or [])
    steps = load_config(RL_EXAMPLE, rl_over).run.train_steps  # --rl-set run.train_steps=N included
    tp2 = min(tp2_steps, steps - 1)
    if tp2 > 0:
        rl_over.append(f"run.exit_interval={steps - tp2}")
    shutil.rmtree(out / "rl", ignore_errors=True)  # the demo always starts RL from its fresh SFT
    rl = run_rl(load_config(RL_EXAMPLE, rl_over))
    destroy_parallel()
    if tp2 > 0:
        _rl_tp2(out, tp2, log, threads)
    times["rl_seconds"] = time.perf_counter() - t
    rl_hf = out / "rl" / "hf"
    validation = _validation_curve(out / "rl" / "metrics.jsonl")
    selected = steps
    if select == "best":  # the step the trainer marked best (checkpoints/best) and exported as hf_best
        best = best_checkpoint(out / "rl" / "checkpoints")
        if best is None:
            raise RuntimeError(f"{out / 'rl' / 'checkpoints'}: the RL run marked no best checkpoint")
        selected = int(read_metadata(best)["step"])
        rl_hf = out / "rl" / "hf_best"
        curve = ", ".join(f"{acc:.1%} at {s}" for s, acc in sorted(validation.items()))
        log(
            f"[demo] RL done in {times['rl_seconds']:.0f}s; greedy accuracy on {n_val} validation problems: "
            f"{curve}; the RL policy is step {selected}'s: {rl_hf}"
        )
    else:
        log(f"[demo] RL done in {times['rl_seconds']:.0f}s; final policy {rl_hf}")

    # -- evaluation + inference scaling -------------------------------------------------------------
    t = time.perf_counter()
    problems = {"heldout": load_problems([paths["heldout"]], "heldout")}
    max_new = rl_base.eval.max_new_tokens
    ev = run_eval(
        [f"sft={sft_hf}", f"rl={rl_hf}"],
        problems,
        out / "eval",
        n=1,
        temperature=0.0,
        max_new_tokens=max_new,
        seed=seed,
        budgets=[b for b in BUDGETS if b <= max_new],
        summary_max_tokens=32,
        scaling_limit=SCALING_PROBLEMS,
        reward_config=RewardConfig(num_workers=1),
        device=device,
        log=log,
    )
    times["eval_seconds"] = time.perf_counter() - t
    acc = {b["checkpoint"]: b["overall"] for b in ev["benchmarks"]}
    per_problem = {k: _per_problem(out / "eval" / "responses.jsonl", k) for k in ("sft", "rl")}
    diff, diff_se = paired_difference(per_problem["sft"], per_problem["rl"])
    summary = {
        "sft_accuracy": acc["sft"]["accuracy"],
        "sft_accuracy_stderr": acc["sft"]["stderr"],
        "rl_accuracy": acc["rl"]["accuracy"],
        "rl_accuracy_stderr": acc["rl"]["stderr"],
        "rl_minus_sft": diff,
        "rl_minus_sft_paired_stderr": diff_se,
        "rl_minus_sft_in_stderr": diff / diff_se if diff_se else float("nan"),
        "heldout_size": acc["rl"]["num_problems"],
        "rl_steps": steps,
        "rl_select": select,
        "rl_selected_step": selected,
        "validation_size": n_val,
        "rl_validation_accuracy": {str(s_): a for s_, a in sorted(validation.items())},
        "rl_tp2_steps": tp2,
        "rl_last_rollout_accuracy": rl.get("accuracy"),
        "scaling_problems": min(SCALING_PROBLEMS, acc["rl"]["num_problems"]),
        "scaling": ev["scaling"],
        "scaling_png": str(out / "eval" / "scaling.png"),
        "sft_final_loss": sft["final_loss"],
        **times,
        "wall_seconds": time.perf_counter() - t0,
        "seed": seed,
        "device": device,
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    log(
        f"[demo] held-out accuracy ({summary['heldout_size']} problems, greedy): "
        f"SFT {summary['sft_accuracy']:.1%} +- {summary['sft_accuracy_stderr']:.1%} -> "
        f"RL {summary['rl_accuracy']:.1%} +- {summary['rl_accuracy_stderr']:.1%} "
        f"({diff:+.1%}, {summary['rl_minus_sft_in_stderr']:.1f} paired standard errors)"
    )
    log(
        f"[demo] SFT {times['sft_seconds']:.0f}s, RL {times['rl_seconds']:.0f}s, eval + scaling "
        f"{times['eval_seconds']:.0f}s, total {summary['wall_seconds']:.0f}s; plot {summary['scaling_png']}"
    )
    return summary
