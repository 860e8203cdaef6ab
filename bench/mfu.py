"""Training throughput and model FLOPs utilisation (MFU) of the Megatron-Core policy.

    python bench/mfu.py                       # Qwen2.5-0.5B shape, bf16 on GPU (fp32 tiny on CPU)
    python bench/mfu.py --shape tiny --steps 5
    python bench/mfu.py --core-attention megatron   # Megatron's unfused local attention, for comparison

FLOPs per trained token (fwd + bwd) = 6 * N + 12 * L * H * S, with N the parameters that take part
in matmuls (the LM head included, the embedding lookup not), L layers, H hidden size, S sequence
length (the second term is attention's QK^T and AV). MFU divides the achieved FLOP/s by the card's
dense bf16 peak (--peak-tflops; H100 SXM: 989).
"""

from __future__ import annotations

import argparse
import json
import time

SHAPES = {
    # Qwen2.5-0.5B: 24 layers, hidden 896, 14 heads / 2 KV groups, SwiGLU 4864, vocab 151936, tied.
    "qwen2.5-0.5b": dict(
        num_layers=24,
        hidden_size=896,
        ffn_hidden_size=4864,
        num_attention_heads=14,
        num_query_groups=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        rope_theta=1000000.0,
    ),
    "tiny": dict(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=512,
        max_position_embeddings=512,
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=4, help="rows per micro-batch")
    ap.add_argument("--microbatches", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--recompute", default="none", choices=["none", "full", "selective"])
    ap.add_argument("--distributed-optimizer", action="store_true")
    ap.add_argument(
        "--core-attention",
        default="sdpa",
        choices=["sdpa", "megatron"],
        help="local-spec core attention: SDPA (flash / memory-efficient kernels) or Megatron's unfused one",
    )
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card")
    args = ap.parse_args()

    import torch

    from megatron_t1.config import config_from_dict
    from megatron_t1.mcore.forward import sft_forward_step
    from megatron_t1.mcore.model import build_model, unwrap
    from megatron_t1.mcore.parallel import destroy_parallel, init_parallel
    from megatron_t1.mcore.train_step import build_optimizer, train_step

    gpu = torch.cuda.is_available()
    seq = args.seq if gpu else min(args.seq, 128)
    cfg = config_from_dict(
        {
            "model": {
                **SHAPES[args.shape],
                "precision": "bf16" if gpu else "fp32",
                "recompute": args.recompute,
                "core_attention": args.core_attention,
            },
            "parallel": {"use_distributed_optimizer": args.distributed_optimizer},
            "data": {
                "seq_length": seq,
                "micro_batch_size": args.micro,
                "global_batch_size": args.micro * args.microbatches,
            },
            "optim": {"lr": 1e-5},
            "run": {"train_steps": args.steps + args.warmup},
        }
    )
    ctx = init_parallel(cfg.parallel, seed=1, device="auto")
    chunks = build_model(cfg)
    opt, sched = build_optimizer(cfg, chunks)
    model = unwrap(chunks[0])
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.embedding.word_embeddings.weight.numel()
    # Tied: the embedding table is also the LM head matmul -> count it once. Untied: the lookup is free.
    n_matmul = n_params if cfg.model.tie_word_embeddings else n_params - n_embed
    g = torch.Generator().manual_seed(0)

    def mb():
        t = torch.randint(0, cfg.model.vocab_size, (args.micro, seq + 1), generator=g)
        return {
            "tokens": t[:, :-1].to(ctx.device),
            "labels": t[:, 1:].to(ctx.device),
            "loss_mask": torch.ones(args.micro, seq, device=ctx.device),
            "position_ids": torch.arange(seq, device=ctx.device).expand(args.micro, seq),
            "attention_mask": None,
        }

    mbs = [mb() for _ in range(args.microbatches)]
    times = []
    for i in range(args.warmup + args.steps):
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = train_step(
            chunks, opt, sched, sft_forward_step, mbs, seq_length=seq, micro_batch_size=args.micro
        )
        if gpu:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    tokens = args.micro * args.microbatches * seq
    L, H = cfg.model.num_layers, cfg.model.hidden_size
    flops_per_token = 6 * n_matmul + 12 * L * H * seq
    achieved = flops_per_token * tokens / step_s
    out = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "shape": args.shape,
        "params_M": round(n_params / 1e6, 1),
        "precision": cfg.model.precision,
        "seq": seq,
        "tokens_per_step": tokens,
        "median_step_s": round(step_s, 4),
        "tokens_per_s": round(tokens / step_s, 1),
        "model_TFLOPs": round(achieved / 1e12, 2),
        "recompute": args.recompute,
        "core_attention": args.core_attention,
        "distributed_optimizer": args.distributed_optimizer,
        "final_loss": round(res.loss, 4),
        "peak_mem_GB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
    }
    if gpu:
        out["MFU"] = round(achieved / (args.peak_tflops * 1e12), 4)
    print(json.dumps(out))
    destroy_parallel()


if __name__ == "__main__":
    main()
