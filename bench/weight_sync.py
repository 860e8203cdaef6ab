"""Weight sync throughput: Megatron TP=2 (2 gloo ranks on CPU) -> HF-named buckets -> HF engine(s).

Model: a Qwen2-style decoder of ~1.08 GB in fp32 (hidden 1024, 18 layers, GQA 16/4 heads, FFN 2816,
vocab 32768, untied head). ``--engines 1``: rank 0 holds the rollout engine (transformers, CPU);
``--engines 2``: each rank holds one (the RL loop's placement on 2 ranks), both filled by the same
stream, so a sync moves the model into 2 engines.

Measured per bucket size, best and median of ``--reps`` runs after one warm-up each:

* ``sync``: :func:`megatron_t1.rollout.weight_sync.push_weights` = plan + per-bucket packing + one
  TP ``all_gather_into_tensor`` + strided merge + converter naming (QKV split, vocab padding dropped)
  + ``HFEngine.update_weights`` (copy into the model), over the HF bytes of the whole model.
* ``raw all_gather``: ``all_gather_into_tensor`` of the same number of output bytes in the same
  bucket sizes (no packing, no copies): the floor set by gloo on this machine.

ratio = sync GB/s / raw GB/s (target >= 0.5).

    python bench/weight_sync.py [--buckets 64 512] [--reps 3] [--engines 1 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from functools import partial


def _cfg():
    from megatron_t1.config import config_from_dict

    return config_from_dict(
        {
            "model": {
                "num_layers": 18,
                "hidden_size": 1024,
                "ffn_hidden_size": 2816,
                "num_attention_heads": 16,
                "num_query_groups": 4,
                "vocab_size": 32768,
                "max_position_embeddings": 2048,
                "tie_word_embeddings": False,
            },
            "parallel": {"tensor_model_parallel_size": 2},
            "data": {"seq_length": 64, "micro_batch_size": 1, "global_batch_size": 1},
            "run": {"device": "cpu"},
        }
    )


def _timed(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    t = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t


def _raw_all_gather(bufs) -> None:
    import torch.distributed as dist

    for src, dst in bufs:
        dist.all_gather_into_tensor(dst, src)


def _worker(
    rank: int, world: int, port: int, buckets: list[float], reps: int, engines: list[int], out: str
) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    from megatron_t1.mcore.export import ExportBuffers
    from megatron_t1.mcore.model import build_model
    from megatron_t1.mcore.parallel import destroy_parallel, init_parallel
    from megatron_t1.rollout.weight_sync import push_weights

    cfg = _cfg()
    init_parallel(cfg.parallel, seed=0, device="cpu")
    chunks = build_model(cfg, wrap_ddp=False)
    engine = None
    if rank == 0 or max(engines) > 1:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from megatron_t1.convert.qwen2 import hf_config
        from megatron_t1.rollout.hf_engine import HFEngine

        class _NoTokenizer:  # update_weights needs no tokenizer
            eos_token_id = pad_token_id = 0

        engine = HFEngine(Qwen2ForCausalLM(Qwen2Config(**hf_config(cfg.model, "float32"))), _NoTokenizer())
    rows = []
    for n_engines in engines:
        mine = engine if rank < n_engines else None
        for mb in buckets:
            # As WeightSync does: the export's buffers persist from one sync to the next.
            sync = partial(
                push_weights,
                mine,
                chunks,
                cfg,
                bucket_mb=mb,
                include_tied_lm_head=False,
                buffers=ExportBuffers(),
            )
            nbytes = sync()[1]  # warm-up (first touch of every buffer) and the byte count
            sync_t = [_timed(sync) for _ in range(reps)]
            # The same output bytes through raw all_gathers of bucket size (each rank sends 1/world).
            total = nbytes // 4
            per = max(1, int(mb * 2**20) // 4 // world)
            sizes = [min(per, total // world - s) for s in range(0, total // world, per)]
            bufs = [(torch.randn(n), torch.empty(world * n)) for n in sizes]
            raw = partial(_raw_all_gather, bufs)
            raw()
            raw_t = [_timed(raw) for _ in range(reps)]
            bufs.clear()
            rows.append((n_engines, mb, nbytes, sync_t, raw_t))
    if rank == 0:
        gb = rows[0][2] / 1e9
        lines = [
            f"model: {gb:.2f} GB of HF tensors (fp32), TP=2 on 2 gloo ranks, {reps} reps",
            "| engines | bucket MB | sync s (best / median) | sync GB/s | raw all_gather s | raw GB/s "
            "| ratio |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n_engines, mb, nb, st, rt in rows:
            s_best, r_best = min(st), min(rt)
            lines.append(
                f"| {n_engines} | {mb:g} | {s_best:.2f} / {statistics.median(st):.2f} | "
                f"{nb / s_best / 1e9:.3f} | "
                f"{r_best:.2f} / {statistics.median(rt):.2f} | {nb / r_best / 1e9:.3f} | "
                f"{r_best / s_best:.2f} |"
            )
        text = "\n".join(lines)
        print(text, flush=True)
        with open(out, "w") as f:
            f.write(text + "\n")
    destroy_parallel()


def main() -> None:
    import tempfile

    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--buckets", type=float, nargs="+", default=[64, 512], help="bucket sizes in MB")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--engines", type=int, nargs="+", default=[1, 2], choices=[1, 2], help="engines filled")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".md") as f:
        mp.start_processes(
            _worker,
            args=(2, port, args.buckets, args.reps, args.engines, f.name),
            nprocs=2,
            start_method="spawn",
        )


if __name__ == "__main__":
    main()
