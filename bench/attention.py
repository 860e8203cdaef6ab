"""SFT train-step time with Megatron's unfused core attention vs the SDPA one, same run, same data.

    python bench/attention.py [--steps 30] [--threads 2] [--seq 512] [--micro 2]

Builds the demo's tiny policy (examples/tiny_cpu/sft.yaml: 4 layers, hidden 128) three times:
Megatron's unfused core attention (dense block-diagonal masks, the only layout it takes), SDPA with
the same masks, SDPA with THD packing (``cu_seqlens``, one causal block per document, the default),
and times ``train_step`` on the same packed rows (synthetic SFT traces), alternating the models step
by step so that load changes on a shared box hit all alike. Prints the median step time of each and
the ratios. CPU only (gloo, one rank).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per variant (default 30)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--seq", type=int, default=512, help="packed row length (default 512)")
    ap.add_argument("--micro", type=int, default=2, help="rows per step (default 2)")
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import torch

    from megatron_t1.config import load_config
    from megatron_t1.data.order import step_slice
    from megatron_t1.data.packing import pack_sequences, schedule_shape
    from megatron_t1.data.sft import SFTDataset
    from megatron_t1.data.synthetic import make_sft_examples
    from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer
    from megatron_t1.mcore.forward import sft_forward_step
    from megatron_t1.mcore.model import build_model
    from megatron_t1.mcore.parallel import init_parallel
    from megatron_t1.mcore.train_step import build_optimizer, train_step
    from megatron_t1.train.sft import load_tokenizer, rank_microbatches

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        examples = make_sft_examples(600, seed=0)
        train_tokenizer(chat_corpus(examples), 512, Path(tmp) / "tok")
        from megatron_t1.data.io import write_jsonl_atomic

        write_jsonl_atomic(Path(tmp) / "sft.jsonl", examples)
        over = [
            f"model.tokenizer={tmp}/tok",
            f"data.train_path={tmp}/sft.jsonl",
            f"data.seq_length={args.seq}",
            f"data.micro_batch_size={args.micro}",
            f"data.global_batch_size={args.micro}",
            f"run.output_dir={tmp}",
        ]
        variants = {
            "megatron": ("megatron", "mask"),
            "sdpa-mask": ("sdpa", "mask"),
            "sdpa-thd": ("sdpa", "thd"),
        }
        cfgs = {
            name: load_config(
                ROOT / "examples/tiny_cpu/sft.yaml",
                [*over, f"model.core_attention={core}", f"data.packing={layout}"],
            )
            for name, (core, layout) in variants.items()
        }
        ctx = init_parallel(cfgs["sdpa-thd"].parallel, seed=0, device="cpu")
        tok = load_tokenizer(cfgs["sdpa-thd"])
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        rows = pack_sequences(SFTDataset(f"{tmp}/sft.jsonl", tok, max_len=args.seq).load(), args.seq, pad)
        models = {}
        for core, cfg in cfgs.items():
            chunks = build_model(cfg)
            models[core] = (chunks, *build_optimizer(cfg, chunks))
        times: dict[str, list[float]] = {core: [] for core in models}
        for i in range(args.steps + 3):
            batch = step_slice(rows, i, args.micro, 0)
            for core, (chunks, opt, sched) in models.items():
                layout = variants[core][1]
                mbs = rank_microbatches(batch, ctx, args.micro, pad, layout)
                seq, micro = schedule_shape(layout, args.seq, args.micro)
                t = time.perf_counter()
                train_step(chunks, opt, sched, sft_forward_step, mbs, seq_length=seq, micro_batch_size=micro)
                if i >= 3:  # warm-up steps are not timed
                    times[core].append(time.perf_counter() - t)
    med = {core: statistics.median(v) for core, v in times.items()}
    tokens = args.seq * args.micro
    for core, m in med.items():
        print(f"{core:9s}: {m * 1000:7.1f} ms per step ({tokens / m:,.0f} tokens/s)")
    for name in ("sdpa-mask", "sdpa-thd"):
        print(
            f"speed-up of {name} over megatron: {med['megatron'] / med[name]:.2f}x ({args.steps} steps each)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
