"""``python -m megatron_t1 COMMAND``: the command-line entry point.

Commands import their heavy dependencies (torch, megatron.core) only when they run, so ``--help``
is instant and ``score`` works without torch.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  python -m megatron_t1 demo                                     # whole CPU pipeline on a tiny model
  python -m megatron_t1 sft --config examples/tiny_cpu/sft.yaml
  python -m megatron_t1 sft --config examples/tiny_cpu/sft.yaml --set run.train_steps=50 --set optim.lr=3e-4
  torchrun --nproc-per-node 2 -m megatron_t1 sft --config examples/tiny_cpu/sft.yaml \\
      --set parallel.tensor_model_parallel_size=2
  python -m megatron_t1 score --input responses.jsonl --output scored.jsonl
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (see examples/); unknown keys are errors")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.lr=1e-5 (repeatable)",
    )


def _cmd_sft(args) -> int:
    from megatron_t1.config import load_config
    from megatron_t1.train.sft import run_sft

    cfg = load_config(args.config, args.overrides)
    summary = run_sft(cfg)
    _print_summary("sft", summary)
    return 0


def _cmd_rl(args) -> int:
    from megatron_t1.config import load_config
    from megatron_t1.train.rl import run_rl

    cfg = load_config(args.config, args.overrides)
    summary = run_rl(cfg)
    _print_summary("rl", summary)
    return 0


def _cmd_demo(args) -> int:
    from megatron_t1.demo import run_demo

    summary = run_demo(
        out_dir=args.out,
        seed=args.seed,
        quick=args.quick,
        reuse_sft=args.reuse_sft,
        rl_overrides=args.rl_set,
        sft_overrides=args.sft_set,
        task_overrides=args.task_set,
        heldout_size=args.heldout,
        device=args.device,
        threads=args.threads,
        tp2_steps=args.tp2_steps,
        select=args.select,
    )
    _print_summary("demo", {k: v for k, v in summary.items() if k != "scaling"})
    return 0


def _cmd_score(args) -> int:
    from megatron_t1.reward.cli import run

    return run(args)


def _cmd_eval(args) -> int:
    from megatron_t1.eval.cli import run

    return run(args)


def _cmd_plan(args) -> int:
    from megatron_t1.plan import run

    return run(args)


def _print_summary(name: str, summary: dict) -> None:
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    print(f"{name} finished:")
    for k, v in summary.items():
        print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_t1",
        description="T1 reasoning RL (arXiv 2501.11651) on Megatron-Core: SFT, RL, scoring, evaluation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "sft",
        help="stage 1: supervised fine-tuning on chat jsonl/parquet (prompt tokens masked)",
        description="Supervised fine-tuning with Megatron-Core. Writes runs/NAME/ (config.yaml, tb/, "
        "metrics.jsonl, checkpoints/). Rerunning the same command resumes from the last checkpoint.",
        epilog="example: python -m megatron_t1 sft --config examples/tiny_cpu/sft.yaml --set run.name=try1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    p.set_defaults(func=_cmd_sft)

    p = sub.add_parser(
        "rl",
        help="stage 2: T1 RL (K samples per prompt, rule reward, entropy bonus, dynamic anchor)",
        description="T1 reinforcement learning on Megatron-Core with a rollout engine kept in sync. "
        "Starts from checkpoint.init_from (an SFT or converted checkpoint); rerunning resumes.",
        epilog="example: python -m megatron_t1 rl --config examples/tiny_cpu/rl.yaml "
        "--set checkpoint.init_from=runs/demo/sft/checkpoints",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    p.set_defaults(func=_cmd_rl)

    p = sub.add_parser(
        "demo",
        help="the whole pipeline on a tiny model on CPU (data, tokenizer, SFT, RL, eval, scaling)",
        description="Builds the synthetic arithmetic task and a tokenizer, SFTs a tiny policy with "
        "Megatron-Core on CPU, runs T1 RL (TP=1, then TP=2 over 2 processes), evaluates both policies "
        "on held-out problems with the inference-scaling sweep. Writes runs/demo/summary.json and "
        "runs/demo/eval/scaling.png.",
    )
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--seed", type=int, default=1234, help="seed for data, init and sampling")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test, low accuracy)")
    p.add_argument(
        "--reuse-sft",
        action="store_true",
        help="keep the SFT checkpoint and export already in --out (iterate on the RL stage only)",
    )
    p.add_argument(
        "--rl-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of examples/tiny_cpu/rl.yaml for the RL stage (repeatable)",
    )
    p.add_argument(
        "--sft-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of examples/tiny_cpu/sft.yaml for the SFT stage (repeatable)",
    )
    p.add_argument(
        "--task-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the task's SFT traces: error_rate (share of wrong, then corrected, attempts; "
        "default 0.25), truncated_fraction, restate (repeatable)",
    )
    p.add_argument(
        "--heldout",
        type=int,
        default=None,
        help="held-out problems to evaluate (default: eval.heldout_size of examples/tiny_cpu/sft.yaml, "
        "8000; 100 with --quick); the scaling sweep uses the first 1000",
    )
    p.add_argument(
        "--select",
        choices=("best", "final"),
        default="best",
        help="the RL policy evaluated: best = the checkpoint (every 5 steps) with the best greedy accuracy "
        "on 2000 validation problems disjoint from the held-out ones (default); final = the last step",
    )
    p.add_argument(
        "--tp2-steps",
        type=int,
        default=2,
        help="last RL steps resumed with TP=2 over 2 processes (default 2; 0 = all at TP=1)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) or cuda: SFT, RL and evaluation on the GPU, for seed sweeps (--tp2-steps 0)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: every core; cap it when several demos share a box)",
    )
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "eval",
        help="benchmark accuracy (pass@1 over n samples) and the inference-scaling sweep with a plot",
        description="Evaluates HF or Megatron checkpoints on MATH500 / AIME2024 / Omni-MATH / GPQA style "
        "files from --data-dir, then truncates the thinking at a sweep of budgets, summarises and "
        "scores. Writes responses.jsonl, results.json/csv, scaling.csv and scaling.png.",
        epilog="example: python -m megatron_t1 eval --checkpoint sft=runs/demo/sft_hf "
        "--benchmarks math500 --data-dir data/benchmarks --n 4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from megatron_t1.eval.cli import add_arguments as _eval_args

    _eval_args(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "plan",
        help="per-GPU memory estimate of a config (weights, grads, optimizer, anchor, activations, KV)",
        description="Estimates per-GPU memory for a config and says what to change when it does not "
        "fit. Exit code 0 when it fits, 3 when it does not.",
        epilog="example: python -m megatron_t1 plan --config examples/qwen2.5_32b/rl.yaml "
        "--gpus-per-node 8 --gpu-mem 80",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from megatron_t1.plan import add_arguments as _plan_args

    _plan_args(p)
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser(
        "score",
        help="score a jsonl of responses with T1's rule-based reward (no torch needed)",
        description="Adds reward, reason and extracted answer to every line of a jsonl of responses.",
        epilog="example: python -m megatron_t1 score --input responses.jsonl --output scored.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    try:
        from megatron_t1.reward.cli import add_arguments

        add_arguments(p)
    except ImportError:  # reward CLI not installed in this checkout
        p.add_argument("--input", required=True)
        p.add_argument("--output", required=True)
    p.set_defaults(func=_cmd_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from megatron_t1.config import ConfigError
    from megatron_t1.data.io import DataError
    from megatron_t1.errors import CheckpointError, TrainingError

    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
