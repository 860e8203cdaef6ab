"""T1's recipe, one knob at a time: RL variants of the CPU demo from one SFT checkpoint per seed.

Every (variant, seed) pair is a ``python -m megatron_t1 demo --reuse-sft`` run with the demo's RL budget
(examples/tiny_cpu/rl.yaml: 20 steps x 16 prompts x 8 samples) and the variant's overrides; the first
variant of each seed trains that seed's SFT, the others start from a copy of it (bench/demo_seeds.py's
scheduler: ``--jobs`` runs at a time, ``--threads`` each). Default variants:

    t1             the shipped recipe (entropy bonus, -1 penalties, EMA anchor 0.9, KL 2e-4 in the reward)
    no_entropy     loss.entropy_coef=0
    no_penalty     reward.penalty=0        (over-long / repetitive / garbage responses score 0, not -1)
    frozen_anchor  anchor.ema=null         (KL to the SFT policy, the classical frozen reference)
    no_kl          loss.kl_coef=0

plus ``--variant NAME:KEY=VALUE[,KEY=VALUE...]`` (fields of examples/tiny_cpu/rl.yaml). Each run also
evaluates its policy every 5 steps on the demo's 2,000 validation problems, greedily and (``--sampled``
problems) with one sample at the rollout temperature, and logs the -1 detectors' rates whether or not they
are punished. Then, per variant and RL step: token entropy, response length, truncation and repetition
rates, reward, KL to the anchor, validation accuracy (greedy and sampled); per variant: the final
held-out greedy accuracy with its paired standard error against ``t1`` (same problems, same seed) and
the inference-scaling slope (accuracy per doubling of the thinking budget) of SFT and of each variant.

    python bench/ablations.py --seeds 1234,1,2 --jobs 2 --threads 1     # ~1 h per seed on 2 cores
    python bench/ablations.py --seeds 1 --variant hot:rollout.temperature=1.2

Writes OUT/ablations.json (every number below), OUT/ablations.md (the tables) and OUT/{entropy,length,
accuracy,scaling}.png. Resumable: a run whose summary.json exists is not run again; rerunning with more
seeds or variants adds only those runs. ``--report-only`` redraws from what is there.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_seeds import Job, run_jobs  # noqa: E402

from megatron_t1.atomic import write_text_atomic  # noqa: E402
from megatron_t1.demo import paired_difference  # noqa: E402

VARIANTS = {
    "t1": [],
    "no_entropy": ["loss.entropy_coef=0"],
    "no_penalty": ["reward.penalty=0"],
    "frozen_anchor": ["anchor.ema=null"],
    "no_kl": ["loss.kl_coef=0"],
}
BASELINE = "t1"
STEP_KEYS = {  # ablations.json name -> the RL run's metrics.jsonl key
    "entropy": "m/entropy",
    "response_len": "response_len",
    "truncated_rate": "truncated_rate",
    "repetition_rate": "repetition_rate",
    "reward": "reward_mean",
    "rollout_accuracy": "accuracy",
    "kl": "kl_anchor",
}
EVAL_KEYS = {"greedy": "heldout_accuracy", "sampled": "heldout_sampled_accuracy"}


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME:KEY=VALUE[,KEY=VALUE...]`` -> (name, overrides)."""
    name, sep, spec = text.partition(":")
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not sep or not name or not items or any("=" not in s for s in items):
        raise SystemExit(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    return name, items


def doubling_slope(budgets: list[float], accuracy: list[float]) -> float:
    """Least-squares slope of accuracy against log2(budget): accuracy gained per doubling of the budget."""
    if len(budgets) < 2:
        return math.nan
    x = [math.log2(b) for b in budgets]
    mx, my = statistics.fmean(x), statistics.fmean(accuracy)
    sxx = sum((a - mx) ** 2 for a in x)
    return sum((a - mx) * (b - my) for a, b in zip(x, accuracy)) / sxx if sxx else math.nan


def per_problem(responses: Path, label: str) -> dict[str, float]:
    """problem id -> mean correctness of checkpoint ``label`` in an eval's responses.jsonl."""
    scores: dict[str, list[float]] = {}
    with open(responses) as f:
        for line in f:
            r = json.loads(line)
            if r["checkpoint"] == label:
                scores.setdefault(r["problem_id"], []).append(float(r["correct"]))
    if not scores:
        raise ValueError(f"{responses}: no responses of checkpoint {label!r}")
    return {k: sum(v) / len(v) for k, v in scores.items()}


def step_curves(metrics: Path) -> dict[str, dict[int, float]]:
    """name -> {step: value} from an RL run's metrics.jsonl (the last record of a step wins)."""
    curves: dict[str, dict[int, float]] = {k: {} for k in [*STEP_KEYS, *EVAL_KEYS]}
    with open(metrics) as f:
        for line in f:
            r = json.loads(line)
            step = int(r["step"])
            for name, key in [*STEP_KEYS.items(), *EVAL_KEYS.items()]:
                if key in r and r[key] is not None:
                    curves[name][step] = float(r[key])
    return curves


def _scaling(summary: dict, checkpoint: str) -> tuple[list[float], list[float]]:
    rows = sorted((r for r in summary["scaling"] if r["checkpoint"] == checkpoint), key=lambda r: r["budget"])
    return [float(r["budget"]) for r in rows], [float(r["accuracy"]) for r in rows]


def collect(out: Path, variants: list[str], seeds: list[int]) -> dict:
    """Every number of the report from the run folders OUT/{variant}_s{seed} that finished."""
    runs: dict[str, dict[int, dict]] = {v: {} for v in variants}
    for v in variants:
        for seed in seeds:
            d = out / f"{v}_s{seed}"
            if not (d / "summary.json").is_file():
                continue
            s = json.loads((d / "summary.json").read_text())
            budgets, acc = _scaling(s, "rl")
            sft_b, sft_acc = _scaling(s, "sft")
            runs[v][seed] = {
                "sft_accuracy": s["sft_accuracy"],
                "accuracy": s["rl_accuracy"],
                "accuracy_stderr": s["rl_accuracy_stderr"],
                "heldout_size": s["heldout_size"],
                "selected_step": s["rl_selected_step"],
                "rl_seconds": s["rl_seconds"],
                "scaling": {"budget": budgets, "accuracy": acc, "sft_accuracy": sft_acc},
                "slope": doubling_slope(budgets, acc),
                "sft_slope": doubling_slope(sft_b, sft_acc),
                "steps": step_curves(d / "rl" / "metrics.jsonl"),
                "_scores": per_problem(d / "eval" / "responses.jsonl", "rl"),
            }
    for v in variants:  # the paired difference to the baseline, per seed and pooled over seeds
        for seed, r in runs[v].items():
            base = runs.get(BASELINE, {}).get(seed)
            r["vs_t1"], r["vs_t1_stderr"] = (
                paired_difference(base["_scores"], r["_scores"]) if base and v != BASELINE else (0.0, 0.0)
            )
    for v in variants:
        for r in runs[v].values():
            r.pop("_scores")
    table = {}
    for v in variants:
        rs = list(runs[v].values())
        if not rs:
            continue
        se = [r["vs_t1_stderr"] for r in rs]
        diff = statistics.fmean(r["vs_t1"] for r in rs)
        pooled_se = math.sqrt(sum(x * x for x in se)) / len(se)  # seeds are independent
        table[v] = {
            "seeds": sorted(runs[v]),
            "accuracy": statistics.fmean(r["accuracy"] for r in rs),
            "sft_accuracy": statistics.fmean(r["sft_accuracy"] for r in rs),
            "vs_t1": diff,
            "vs_t1_stderr": pooled_se,
            "vs_t1_in_stderr": diff / pooled_se if pooled_se else math.nan,
            "slope": statistics.fmean(r["slope"] for r in rs),
            "sft_slope": statistics.fmean(r["sft_slope"] for r in rs),
            "rl_seconds": statistics.fmean(r["rl_seconds"] for r in rs),
            **{
                f"{k}_last": statistics.fmean(_last(r["steps"][k]) for r in rs)
                for k in ("entropy", "response_len", "truncated_rate", "repetition_rate", "kl")
            },
        }
    return {"variants": variants, "seeds": seeds, "baseline": BASELINE, "runs": runs, "table": table}


def _last(curve: dict) -> float:
    return curve[max(curve)] if curve else math.nan


def _mean_curve(runs: dict[int, dict], name: str) -> tuple[list[int], list[float]]:
    """Steps every seed logged and the mean over seeds."""
    per_seed = [r["steps"][name] for r in runs.values()]
    steps = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
    return steps, [statistics.fmean(c[s] for c in per_seed) for s in steps]


def markdown(report: dict) -> str:
    t, seeds = report["table"], report["seeds"]
    lines = [
        f"Seeds {', '.join(map(str, seeds))}; means over the seeds each variant finished. vs t1: paired "
        "difference of held-out greedy accuracy to the t1 run of the same seed (same problems), with its "
        "standard error pooled over seeds. Slope: accuracy points per doubling of the thinking budget "
        "(least squares on log2 budget). Last-step values are the RL run's final step.",
        "",
        "| variant | held-out greedy | vs t1 (SE) | in SE | slope | SFT slope | entropy | length | "
        "truncated | repetition | KL | RL s |",
        "|---" * 12 + "|",
    ]
    for v, r in t.items():
        vs = "-" if v == report["baseline"] else f"{100 * r['vs_t1']:+.1f} ({100 * r['vs_t1_stderr']:.1f})"
        z = "-" if v == report["baseline"] else f"{r['vs_t1_in_stderr']:+.1f}"
        lines.append(
            f"| {v} | {100 * r['accuracy']:.1f}% (SFT {100 * r['sft_accuracy']:.1f}%) | {vs} | {z} "
            f"| {100 * r['slope']:.1f} | {100 * r['sft_slope']:.1f} | {r['entropy_last']:.3f} "
            f"| {r['response_len_last']:.0f} | {100 * r['truncated_rate_last']:.2f}% "
            f"| {100 * r['repetition_rate_last']:.2f}% | {r['kl_last']:.2e} | {r['rl_seconds']:.0f} |"
        )
    lines += ["", "Validation accuracy (greedy / sampled at the rollout temperature) by step, seed means:"]
    lines += [""]
    for v in t:
        for kind in EVAL_KEYS:
            steps, vals = _mean_curve(report["runs"][v], kind)
            if steps:
                pts = ", ".join(f"{s}: {100 * a:.1f}" for s, a in zip(steps, vals))
                lines.append(f"- {v}, {kind}: {pts}")
    return "\n".join(lines) + "\n"


def plots(report: dict, out: Path) -> list[Path]:
    """entropy / length / accuracy vs step and the scaling curves, one line per variant (seed means)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from megatron_t1.atomic import atomic_path

    written = []
    panels = {
        "entropy": [("entropy", "token entropy (nats)")],
        "length": [("response_len", "mean response tokens"), ("repetition_rate", "repetition rate")],
        "accuracy": [("greedy", "validation greedy accuracy"), ("sampled", "validation sampled accuracy")],
    }
    for fname, specs in panels.items():
        fig, axes = plt.subplots(1, len(specs), figsize=(5.5 * len(specs), 4), squeeze=False)
        for ax, (name, label) in zip(axes[0], specs):
            for v in report["table"]:
                steps, vals = _mean_curve(report["runs"][v], name)
                if steps:
                    ax.plot(steps, vals, marker="o" if len(steps) < 8 else None, label=v)
            ax.set_xlabel("RL step")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{fname}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    first = None
    for v in report["table"]:
        rs = list(report["runs"][v].values())
        budgets = rs[0]["scaling"]["budget"]
        if first is None:
            first = rs
            sft = [statistics.fmean(r["scaling"]["sft_accuracy"][i] for r in rs) for i in range(len(budgets))]
            ax.plot(budgets, sft, "k--", marker="x", label="SFT")
        acc = [statistics.fmean(r["scaling"]["accuracy"][i] for r in rs) for i in range(len(budgets))]
        ax.plot(budgets, acc, marker="o", label=v)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("thinking budget (tokens)")
    ax.set_ylabel("held-out greedy accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "scaling.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return [*written, path]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1234,1,2", help="comma-separated demo seeds (default: three)")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated built-in variants to run (default: all: {', '.join(VARIANTS)})",
    )
    p.add_argument("--variant", action="append", default=[], help="extra variant NAME:KEY=VALUE[,KEY=VALUE]")
    p.add_argument("--out", default="runs/ablations", help="folder of the runs and the report")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--heldout", type=int, default=2000, help="held-out problems of the final evaluation")
    p.add_argument("--sampled", type=int, default=1000, help="validation problems also sampled at T per eval")
    p.add_argument("--quick", action="store_true", help="demo --quick runs (plumbing test, low accuracy)")
    p.add_argument("--rl-set", action="append", default=[], help="an RL override applied to every variant")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; stop the runs still going")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    args = p.parse_args(argv)
    variants = {}
    for name in (v for v in args.variants.split(",") if v):
        if name not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {name!r} (built in: {', '.join(VARIANTS)})")
        variants[name] = VARIANTS[name]
    for text in args.variant:
        name, items = parse_variant(text)
        variants[name] = items
    if BASELINE not in variants:
        raise SystemExit(f"--variants must include the baseline {BASELINE!r} (paired differences need it)")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)

    failed: list[str] = []
    if not args.report_only:
        common = [f"eval.sampled_size={args.sampled}", "eval.eval_at_start=true", *args.rl_set]
        jobs, owners = [], {}
        for name, items in variants.items():  # variant-major: every seed's baseline (and SFT) first
            for seed in seeds:
                job = Job(name, seed, [*common, *items], [], out / f"{name}_s{seed}")
                job.log = out / "logs" / f"{name}_s{seed}.log"
                owner = owners.setdefault(seed, job)
                job.sft_owner = None if owner is job else owner
                spec = out / f"{name}_s{seed}.json"
                if (job.out / "summary.json").is_file() and spec.is_file():
                    if json.loads(spec.read_text()) != job.rl:
                        raise SystemExit(
                            f"{job.out}: finished with other overrides ({spec}); remove it or use other --out"
                        )
                    job.status = "ok"
                else:
                    write_text_atomic(spec, json.dumps(job.rl))
                jobs.append(job)
        demo_args = argparse.Namespace(
            jobs=args.jobs,
            threads=args.threads,
            device=args.device,
            tp2_steps=0,
            select="best",
            heldout=args.heldout,
            quick=args.quick,
            sft_from=None,
            time_limit=args.time_limit,
        )
        t0 = time.time()
        run_jobs(jobs, demo_args, out / "results.jsonl")
        print(f"[ablations] runs done in {time.time() - t0:.0f}s", flush=True)
        failed = [f"{j.recipe} seed {j.seed}: {j.status} (log {j.log})" for j in jobs if j.status != "ok"]
        for line in failed:
            print(line)
    report = collect(out, list(variants), seeds)
    if not report["table"]:
        raise SystemExit(f"{out}: no finished run to report on")
    write_text_atomic(out / "ablations.json", json.dumps(report, indent=1))
    md = markdown(report)
    write_text_atomic(out / "ablations.md", md)
    pngs = plots(report, out)
    print(md)
    print(f"[ablations] {out / 'ablations.json'}, {out / 'ablations.md'}, " + ", ".join(map(str, pngs)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
