"""What routing replay does to the train/rollout mismatch of an MoE policy (CPU, tiny Qwen3-MoE).

The RL loop (``python -m megatron_t1 rl``) runs a few steps of a randomly initialised Qwen3-MoE
policy (``--layers`` layers of ``--experts`` experts, top ``--topk``) with the HF rollout engine
recording every token's experts (``rollout.record_routing``), four ways: the engine in float32 (the
trainer's numerics) or bfloat16 (a stand-in for a GPU engine's kernels), and the trainer routing on its
own or replaying the engine's routing (``loss.routing_replay``). Per run and step it reads the
metrics the loop logs before the update:

    moe/route_agreement   share of (token, layer) pairs where the trainer's own top-k equals the engine's
    mismatch_mean / _max  mean / max |log pi_trainer(y_t) - log mu_engine(y_t)| over response tokens

and writes OUT/routing_replay.json and a markdown table (stdout and OUT/routing_replay.md).

    python bench/routing_replay.py --out runs/routing_replay    # 45 min on 2 cores shared with other jobs
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from megatron_t1.atomic import write_text_atomic

RUNS = {  # name -> (engine dtype, replay)
    "fp32_own": ("float32", False),
    "fp32_replay": ("float32", True),
    "bf16_own": ("bfloat16", False),
    "bf16_replay": ("bfloat16", True),
}
KEYS = ("moe/route_agreement", "mismatch_mean", "mismatch_max", "sync/parity_mean_abs")


def make_data(d: Path) -> None:
    """The RL tests' data: a tokenizer trained on the synthetic SFT chats and 64 arithmetic prompts."""
    from megatron_t1.data.io import write_jsonl_atomic
    from megatron_t1.data.synthetic import make_problems, make_sft_examples
    from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer

    if not (d / "tok").exists():
        train_tokenizer(chat_corpus(make_sft_examples(200, seed=5)), 512, d / "tok")
    probs = make_problems(64, seed=5, split="train")
    write_jsonl_atomic(d / "prompts.jsonl", [{"question": p.question, "answer": p.answer} for p in probs])


def overrides(args, data: Path, out: Path, name: str, dtype: str, replay: bool) -> list[str]:
    return [
        "model.arch=qwen3_moe", f"model.num_layers={args.layers}", "model.hidden_size=64",
        "model.ffn_hidden_size=96", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.kv_channels=32", "model.qk_layernorm=true", "model.add_qkv_bias=false",
        "model.tie_word_embeddings=false", f"model.num_experts={args.experts}",
        f"model.moe_router_topk={args.topk}", "model.moe_ffn_hidden_size=32", "model.moe_aux_loss_coeff=0.01",
        "model.vocab_size=512", "model.max_position_embeddings=256", f"model.tokenizer={data}/tok",
        f"data.train_path={data}/prompts.jsonl", "data.seq_length=128", "data.micro_batch_size=4",
        "data.global_batch_size=8", "optim.lr=1e-3", "optim.lr_decay_style=constant",
        "rollout.prompts_per_step=8", "rollout.n_samples=4", "rollout.max_new_tokens=64",
        "rollout.temperature=1.0", f"rollout.hf_dtype={dtype}", "rollout.record_routing=true",
        "rollout.parity_threshold=1.0", f"loss.routing_replay={str(replay).lower()}",
        "reward.num_workers=1", "loss.entropy_coef=0.01", "anchor.ema=0.9", f"run.name={name}",
        f"run.output_dir={out}", f"run.train_steps={args.steps}", "run.device=cpu", f"run.seed={args.seed}",
        "log.progress_bar=false", "log.tensorboard=false", "eval.eval_at_start=false",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/routing_replay", help="folder of the runs and the report")
    p.add_argument("--steps", type=int, default=4, help="RL steps per run")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    out = Path(args.out)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    make_data(data)
    report: dict = {"args": vars(args), "runs": {}}
    for name, (dtype, replay) in RUNS.items():
        cfg = out / f"{name}.yaml"
        cfg.write_text("{}\n")
        t = time.perf_counter()
        sets = [x for kv in overrides(args, data, out, name, dtype, replay) for x in ("--set", kv)]
        cmd = [sys.executable, "-m", "megatron_t1", "rl", "--config", str(cfg), *sets]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "loss" in r]
        report["runs"][name] = {
            "engine_dtype": dtype,
            "replay": replay,
            "seconds": time.perf_counter() - t,
            "steps": [{k: r.get(k) for k in ("step", *KEYS)} for r in steps],
            **{k: statistics.fmean(r[k] for r in steps) for k in KEYS if all(k in r for r in steps)},
        }
        print(f"{name}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    lines = [
        f"Tiny Qwen3-MoE ({args.layers} layers, {args.experts} experts, top {args.topk}), "
        f"{args.steps} RL steps, seed {args.seed}; means over the steps:",
        "",
        "| run | engine | trainer routing | route agreement | mismatch mean | mismatch max | parity mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["runs"].items():
        lines.append(
            f"| {name} | {r['engine_dtype']} | {'replayed' if r['replay'] else 'own'} | "
            f"{100 * r['moe/route_agreement']:.2f}% | {r['mismatch_mean']:.2e} | {r['mismatch_max']:.2e} | "
            f"{r['sync/parity_mean_abs']:.2e} |"
        )
    md = "\n".join(lines) + "\n"
    write_text_atomic(out / "routing_replay.json", json.dumps(report, indent=2))
    write_text_atomic(out / "routing_replay.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
