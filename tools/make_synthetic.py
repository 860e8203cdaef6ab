"""Write the CPU demo's synthetic arithmetic task: SFT traces, RL prompts, held-out set, tokenizer.

Example:
    python tools/make_synthetic.py --out runs/demo/data
    python tools/make_synthetic.py --out /tmp/task --n-train 2000 --n-heldout 500 --seed 7 --vocab-size 512

Writes, each atomically (temporary file or folder, then rename):
    OUT/sft_train.jsonl   {"messages": [user prompt, assistant trace], "answer": str}  (T1 SFT layout)
    OUT/rl_prompts.jsonl  {"id", "question", "answer"}    train-split problems for RL
    OUT/heldout.jsonl     {"id", "question", "answer"}    held-out problems (disjoint from both above)
    OUT/tokenizer/        byte-level BPE with a ChatML chat template (AutoTokenizer.from_pretrained)

Deterministic in the arguments; nothing is downloaded. A few seconds for the defaults.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_t1.atomic import atomic_dir  # noqa: E402
from megatron_t1.data.io import write_jsonl_atomic  # noqa: E402
from megatron_t1.data.synthetic import make_problems, make_sft_examples  # noqa: E402
from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer  # noqa: E402


def build(args: argparse.Namespace) -> dict:
    """Generate and write everything; returns counts and paths."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    difficulty = {"n_operands": tuple(args.operands), "digits": tuple(args.digits)}
    examples = make_sft_examples(
        args.n_train,
        args.seed,
        truncated_fraction=args.truncated_fraction,
        error_rate=args.error_rate,
        restate=args.restate,
        **difficulty,
    )
    # RL prompts come from a separate stream of the train split (their own seed offset).
    rl = make_problems(args.n_rl, args.seed + 1_000_003, "train", **difficulty)
    heldout = make_problems(args.n_heldout, args.seed, "heldout", **difficulty)
    n_sft = write_jsonl_atomic(out / "sft_train.jsonl", examples)
    write_jsonl_atomic(
        out / "rl_prompts.jsonl",
        ({"id": f"rl-{i}", "question": p.question, "answer": p.answer} for i, p in enumerate(rl)),
    )
    write_jsonl_atomic(
        out / "heldout.jsonl",
        ({"id": f"heldout-{i}", "question": p.question, "answer": p.answer} for i, p in enumerate(heldout)),
    )
    with atomic_dir(out / "tokenizer", replace=True) as tmp:
        tok = train_tokenizer(chat_corpus(examples), args.vocab_size, tmp)
    return {"out": str(out), "n_sft": n_sft, "n_rl": len(rl), "n_heldout": len(heldout), "vocab": len(tok)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="make_synthetic.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--n-train", type=int, default=12000, help="SFT examples (T1 used ~12k)")
    ap.add_argument("--n-heldout", type=int, default=500, help="held-out problems")
    ap.add_argument("--n-rl", type=int, default=4000, help="RL prompts (train split)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument(
        "--vocab-size", type=int, default=512, help="BPE vocabulary bound (the corpus may need fewer)"
    )
    ap.add_argument("--operands", type=int, nargs=2, default=(3, 6), metavar=("MIN", "MAX"), help="operands")
    ap.add_argument(
        "--digits", type=int, nargs=2, default=(1, 1), metavar=("MIN", "MAX"), help="digits/operand"
    )
    ap.add_argument("--error-rate", type=float, default=0.25, help="share of wrong attempts in the traces")
    ap.add_argument(
        "--truncated-fraction", type=float, default=0.1, help="answer-from-truncated-thinking share"
    )
    ap.add_argument(
        "--restate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="'now: ...' lines after each step",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    info = build(args)
    print(
        f"wrote {info['out']}: {info['n_sft']} SFT examples, {info['n_rl']} RL prompts, "
        f"{info['n_heldout']} held-out, tokenizer vocab {info['vocab']} ({time.perf_counter() - t0:.1f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
