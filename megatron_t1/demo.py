"""The one-command CPU demo (``make demo`` / ``python -m megatron_t1 demo``).

1. Build the synthetic arithmetic task: SFT traces in T1's trial-and-error style, held-out problems,
   and a byte-level BPE tokenizer trained on them (nothing is downloaded).
2. SFT a tiny policy with Megatron-Core on CPU (``examples/tiny_cpu/sft.yaml``).
3. Export the checkpoint as an HF folder (the converter) and measure held-out accuracy with greedy
   decoding, scored by T1's reward (math-verify).
4. Write ``summary.json`` (sft_accuracy, heldout_size, wall_seconds, ...) into the run folder.

The RL stage joins here when the RL trainer lands (see the open issues).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny_cpu" / "sft.yaml"


def build_task(data_dir: Path, *, seed: int, n_train: int, n_heldout: int, vocab_size: int) -> dict:
    """Write sft_train.jsonl, heldout.jsonl and tokenizer/ into ``data_dir`` (idempotent)."""
    from megatron_t1.data.io import write_jsonl_atomic
    from megatron_t1.data.synthetic import make_problems, make_sft_examples
    from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer

    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "train": data_dir / "sft_train.jsonl",
        "heldout": data_dir / "heldout.jsonl",
        "tokenizer": data_dir / "tokenizer",
    }
    examples = make_sft_examples(n_train, seed)
    heldout = make_problems(n_heldout, seed, "heldout")
    write_jsonl_atomic(paths["train"], examples)
    write_jsonl_atomic(paths["heldout"], [{"question": p.question, "answer": p.answer} for p in heldout])
    if not (paths["tokenizer"] / "tokenizer.json").exists():
        tmp = data_dir / "tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        train_tokenizer(chat_corpus(examples), vocab_size, tmp)
        os.replace(tmp, paths["tokenizer"])
    return {"paths": paths, "heldout": heldout}


def run_demo(out_dir: str = "runs/demo", *, seed: int = 1234, quick: bool = False) -> dict:
    """Run the demo end to end; returns (and writes) the summary."""
    import torch

    from megatron_t1.config import load_config
    from megatron_t1.convert.offline import mcore_to_hf
    from megatron_t1.eval.heldout import evaluate_hf
    from megatron_t1.mcore.parallel import destroy_parallel
    from megatron_t1.train.sft import run_sft

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(out_dir)
    base = load_config(EXAMPLE)
    heldout_size = 100 if quick else base.eval.heldout_size
    task = build_task(
        out / "data",
        seed=seed,
        n_train=base.data.global_batch_size * 50 if quick else 12000,
        n_heldout=heldout_size,
        vocab_size=base.model.vocab_size,
    )
    paths = task["paths"]
    print(f"[demo] task: {paths['train']} ({heldout_size} held-out problems), tokenizer {paths['tokenizer']}")

    overrides = [
        f"run.output_dir={out}",
        "run.name=sft",
        f"run.seed={seed}",
        f"data.seed={seed}",
        f"data.train_path={paths['train']}",
        f"model.tokenizer={paths['tokenizer']}",
    ]
    if quick:
        overrides += ["run.train_steps=20"]
    cfg = load_config(EXAMPLE, overrides)
    t_sft = time.perf_counter()
    sft = run_sft(cfg)
    destroy_parallel()
    sft_seconds = time.perf_counter() - t_sft

    hf_dir = out / "sft_hf"
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    mcore_to_hf(out / "sft" / "checkpoints", hf_dir, progress=False)
    for f in Path(paths["tokenizer"]).iterdir():  # the export carries no tokenizer of its own here
        if f.is_file() and not (hf_dir / f.name).exists():
            shutil.copy2(f, hf_dir / f.name)

    t_eval = time.perf_counter()
    res = evaluate_hf(
        hf_dir,
        task["heldout"],
        max_new_tokens=cfg.eval.max_new_tokens,
        temperature=0.0,
        seed=seed,
    )
    eval_seconds = time.perf_counter() - t_eval
    (out / "sft_heldout.jsonl").write_text("\n".join(json.dumps(r) for r in res.records) + "\n")
    summary = {
        "sft_accuracy": res.accuracy,
        "sft_accuracy_stderr": res.stderr,
        "heldout_size": res.num_problems,
        "sft_final_loss": sft["final_loss"],
        "sft_seconds": sft_seconds,
        "eval_seconds": eval_seconds,
        "mean_response_tokens": res.mean_response_tokens,
        "wall_seconds": time.perf_counter() - t0,
        "seed": seed,
    }
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "summary.json")
    print(
        f"[demo] held-out accuracy after SFT: {res.accuracy:.1%} +- {res.stderr:.1%} "
        f"({res.num_problems} problems, greedy); SFT {sft_seconds:.0f}s, eval {eval_seconds:.0f}s"
    )
    return summary
