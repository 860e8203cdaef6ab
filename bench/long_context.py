"""Memory and time of one RL step on 17,408-token packed rows: dense masks vs THD, logits vs fused.

    python bench/long_context.py [--seq 17408] [--rows 2] [--hidden 256] [--vocab 32768] [--threads 2]

One T1 step as the RL loop runs it (policy log-prob pass, anchor log-prob pass with the anchor's
weights swapped in, one optimizer step with the T1 loss) on ``--rows`` packed rows of ``--seq``
tokens (responses of 9k, 5k, 3k and 12k tokens: the 32B example's row length), on one CPU rank,
fp32, in four variants, each in its own process:

- ``mask+logits``: what the loop did before THD packing: a dense [S, S] block-diagonal mask per row,
  the output layer's [tokens, V] logits;
- ``mask+fused``: the same mask, the fused output layer (no logits);
- ``thd+logits``: THD packing (``cu_seqlens``), logits;
- ``thd+fused``: THD and the fused output layer (the 32B example's settings, and what ``auto`` picks).

Reports, per variant, the step's peak resident memory above what the process held before the step
(``ru_maxrss`` high-water mark minus RSS before; the model, optimizer and anchor are allocated
before), its wall time, and the loss (identical up to fp32 rounding across variants: same weights,
same data). Compare ratios from one run: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "mask+logits": ("mask", False),
    "mask+fused": ("mask", True),
    "thd+logits": ("thd", False),
    "thd+fused": ("thd", True),
}
RESPONSES = [(9_000, 200), (5_000, 150), (3_000, 100), (12_000, 300)]  # (tokens, prompt tokens)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> dict:
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    import torch

    from megatron_t1.config import config_from_dict
    from megatron_t1.data.packing import schedule_shape
    from megatron_t1.data.rl_batch import collate_rl_rank, plan_rl_packing
    from megatron_t1.mcore.anchor_store import AnchorStore
    from megatron_t1.mcore.model import build_model
    from megatron_t1.mcore.parallel import init_parallel
    from megatron_t1.mcore.rl_forward import compute_logprobs, rl_forward_step
    from megatron_t1.mcore.train_step import build_optimizer, train_step

    torch.set_num_threads(args.threads)
    layout, fused = VARIANTS[args.child]
    seq = args.seq
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict(
            {
                "model": {
                    "num_layers": args.layers,
                    "hidden_size": args.hidden,
                    "ffn_hidden_size": 2 * args.hidden,
                    "num_attention_heads": args.heads,
                    "num_query_groups": args.heads // 2,
                    "vocab_size": args.vocab,
                    "max_position_embeddings": seq,
                    "tie_word_embeddings": False,
                },
                "data": {"seq_length": seq, "micro_batch_size": 1, "global_batch_size": 1, "packing": layout},
                "optim": {"lr": 1e-5},
                "loss": {"fused_output_layer": fused, "entropy_coef": 1e-3},
                "anchor": {"ema": 0.99},
                "run": {"device": "cpu", "output_dir": tmp},
            }
        )
        init_parallel(cfg.parallel, seed=0, device="cpu")
        chunks = build_model(cfg)
        opt, sched = build_optimizer(cfg, chunks)
        anchor = AnchorStore(chunks, cfg.anchor)
        g = torch.Generator().manual_seed(0)
        scale = seq / 17_408  # the responses scale with the row (a shorter --seq for a quick try)
        responses = [(int(n * scale), int(p * scale) + 1) for n, p in RESPONSES] * max(1, args.rows // 2)
        docs = [torch.randint(0, args.vocab - 1, (n,), generator=g).tolist() for n, _ in responses]
        plens = [p for _, p in responses]
        G = sum(len(d) - p for d, p in zip(docs, plens))
        before = _rss_bytes()
        t = time.perf_counter()
        plan = plan_rl_packing([len(d) for d in docs], seq, dp=1, micro_batch_size=1)
        mbs = collate_rl_rank(plan, 0, docs, plens, pad_id=0, layout=layout)
        s, b = schedule_shape(layout, seq, 1)
        kw = dict(
            temperature=1.0, vocab_size=args.vocab, seq_length=s, micro_batch_size=b, fused_output_layer=fused
        )
        pol = compute_logprobs(chunks, mbs, **kw)
        with anchor.swapped_in():
            anc = compute_logprobs(chunks, mbs, **kw)
        for i, mb in enumerate(mbs):
            mb["advantages"] = torch.where(mb["doc_ids"] % 2 == 0, 1.0, -1.0) * mb["loss_mask"]
            mb["anchor_logprobs"], mb["rollout_logprobs"] = anc[i]["logprobs"], pol[i]["logprobs"]

        def fn(it, m):
            return rl_forward_step(
                it, m, loss_config=cfg.loss, temperature=1.0, vocab_size=args.vocab, global_num_tokens=G,
                global_num_seqs=len(docs),
            )  # fmt: skip

        out = train_step(chunks, opt, sched, fn, mbs, seq_length=s, micro_batch_size=b)
        seconds = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "variant": args.child,
        "rows": len(mbs),
        "tokens": int(sum(len(d) for d in docs)),
        "step_peak_gib": max(0, peak - before) / 2**30,
        "rss_before_gib": before / 2**30,
        "seconds": seconds,
        "loss": out.loss,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=17_408, help="packed row length (default 17408)")
    ap.add_argument("--rows", type=int, default=2, help="rows per step, even (default 2)")
    ap.add_argument("--layers", type=int, default=2, help="transformer layers (default 2)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    ap.add_argument("--vocab", type=int, default=32_768, help="vocabulary (default 32768)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=29533, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    results = []
    for i, name in enumerate(args.variants):
        cmd = [sys.executable, __file__, "--child", name, "--port", str(args.port + i)]
        for k in ("seq", "rows", "layers", "hidden", "heads", "vocab", "threads"):
            cmd += [f"--{k}", str(getattr(args, k))]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            print(f"{name}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
            results.append({"variant": name, "failed": proc.returncode})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(
            f"{name:12s} {r['rows']} rows x {args.seq} tokens: step peak {r['step_peak_gib']:6.2f} GiB above "
            f"{r['rss_before_gib']:.2f} GiB, {r['seconds']:6.1f} s, loss {r['loss']:.6f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
