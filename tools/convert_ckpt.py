#!/usr/bin/env python
"""Convert checkpoints between HF (transformers / vLLM) and Megatron-Core torch_dist.

    python tools/convert_ckpt.py hf-to-mcore --hf-dir Qwen2.5-32B --out ckpt/qwen32b --tp 8 --pp 2
    python tools/convert_ckpt.py mcore-to-hf --mcore-dir runs/rl/checkpoints --out export/qwen32b-t1
    python tools/convert_ckpt.py verify --hf-dir Qwen2.5-32B --mcore-dir ckpt/qwen32b --tp 2

Supported HF architectures: Qwen2ForCausalLM, LlamaForCausalLM, GlmForCausalLM, Qwen3ForCausalLM and
Qwen3MoeForCausalLM (experts are stored by global index, so an MoE checkpoint loads at any EP too;
--ep only checks the split). Conversion streams tensor by tensor (bytes are copied file to file
unless --dtype changes them; then one tensor at a time is in memory) and writes into a temporary
folder renamed at the end. The logic lives in megatron_t1.convert (pure, no megatron import) and
megatron_t1.mcore.convert_io (verify).
"""

from __future__ import annotations

import argparse
import re
import sys
import time

HF_TO_MCORE_EXAMPLE = """example:
  python tools/convert_ckpt.py hf-to-mcore --hf-dir /models/Qwen2.5-32B --out /ckpt/qwen2.5-32b --tp 8 --pp 2
  # then train from it at any TP/PP:  --set checkpoint.init_from=/ckpt/qwen2.5-32b
"""
MCORE_TO_HF_EXAMPLE = """example:
  python tools/convert_ckpt.py mcore-to-hf --mcore-dir runs/t1/checkpoints --out /export/qwen2.5-32b-t1 \\
      --hf-template /models/Qwen2.5-32B --dtype bf16
  # --mcore-dir takes a checkpoint folder or a run's checkpoints/ folder (its `latest` is used)
"""
VERIFY_EXAMPLE = """example:
  python tools/convert_ckpt.py verify --hf-dir /models/glm-4-9b-chat-hf --mcore-dir /ckpt/glm4-9b --tp 2
  # prints max |logit difference| and top-1 agreement; exit status 1 above --tol
"""


def _size(text: str) -> int:
    """'5GB' / '500MB' / '123' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_ckpt.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{hf-to-mcore,mcore-to-hf,verify}")
    fmt = argparse.RawDescriptionHelpFormatter

    a = sub.add_parser(
        "hf-to-mcore",
        help="HF safetensors folder -> Megatron torch_dist checkpoint",
        description="Write a Megatron distributed (torch_dist) checkpoint that "
        "`--set checkpoint.init_from=DIR` loads at any TP/PP (and EP for MoE models).",
        epilog=HF_TO_MCORE_EXAMPLE,
        formatter_class=fmt,
    )
    a.add_argument("--hf-dir", required=True, help="HF model folder (config.json + *.safetensors)")
    a.add_argument("--out", required=True, help="output checkpoint folder (must not exist)")
    a.add_argument(
        "--tp",
        type=int,
        default=None,
        help="tensor parallel size to check the model against "
        "(and pad the vocabulary for); the checkpoint still loads at any TP",
    )
    a.add_argument("--pp", type=int, default=None, help="pipeline parallel size to check against")
    a.add_argument(
        "--ep", type=int, default=None, help="MoE: expert parallel size to check against (experts divisible)"
    )
    a.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="stored dtype (default: as in HF)")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")

    b = sub.add_parser(
        "mcore-to-hf",
        help="Megatron torch_dist checkpoint -> HF folder (transformers / vLLM)",
        description="Write config.json, model-0000x-of-0000y.safetensors + model.safetensors.index.json, "
        "tokenizer files and generation_config.json.",
        epilog=MCORE_TO_HF_EXAMPLE,
        formatter_class=fmt,
    )
    b.add_argument("--mcore-dir", required=True, help="checkpoint folder, or a run's checkpoints/ folder")
    b.add_argument("--out", required=True, help="output HF folder (must not exist)")
    b.add_argument(
        "--hf-template",
        default=None,
        help="HF folder whose config.json and tokenizer files "
        "are used (default: the ones stored in the checkpoint at conversion)",
    )
    b.add_argument(
        "--dtype", choices=["bf16", "fp32"], default=None, help="output dtype (default: as stored)"
    )
    b.add_argument("--max-shard-size", type=_size, default=_size("5GB"), help="largest safetensors shard")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = sub.add_parser(
        "verify",
        help="compare logits of the HF model and the Megatron checkpoint",
        description="Run transformers and Megatron (tp x pp x ep local ranks) on the same random tokens; "
        "print the max abs logit difference and the top-1 agreement.",
        epilog=VERIFY_EXAMPLE,
        formatter_class=fmt,
    )
    c.add_argument("--hf-dir", required=True, help="HF model folder")
    c.add_argument("--mcore-dir", required=True, help="Megatron checkpoint folder")
    c.add_argument("--tp", type=int, default=1, help="tensor parallel ranks to load at")
    c.add_argument("--pp", type=int, default=1, help="pipeline parallel ranks to load at")
    c.add_argument(
        "--ep", type=int, default=1, help="MoE: expert parallel ranks to load at (x TP x PP ranks)"
    )
    c.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    c.add_argument("--batch", type=int, default=2, help="sequences")
    c.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    c.add_argument("--tol", type=float, default=1e-3, help="max abs logit difference allowed (fp32)")
    c.add_argument("--min-top1", type=float, default=0.99, help="minimum top-1 agreement")
    c.add_argument("--device", choices=["cpu", "auto"], default="cpu", help="where the Megatron ranks run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_t1.config import ConfigError
    from megatron_t1.convert.maps import ConvertError

    try:
        t0 = time.perf_counter()
        if args.command == "hf-to-mcore":
            from megatron_t1.convert.offline import hf_to_mcore

            out = hf_to_mcore(
                args.hf_dir,
                args.out,
                tp=args.tp,
                pp=args.pp,
                ep=args.ep,
                dtype=args.dtype,
                progress=not args.no_progress,
            )
            print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
        elif args.command == "mcore-to-hf":
            from megatron_t1.convert.offline import mcore_to_hf

            out = mcore_to_hf(
                args.mcore_dir,
                args.out,
                hf_template=args.hf_template,
                dtype=args.dtype,
                max_shard_bytes=args.max_shard_size,
                progress=not args.no_progress,
            )
            print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
        else:
            from megatron_t1.mcore.convert_io import verify

            r = verify(
                args.hf_dir,
                args.mcore_dir,
                tp=args.tp,
                pp=args.pp,
                ep=args.ep,
                seq_len=args.seq_len,
                batch=args.batch,
                seed=args.seed,
                device=args.device,
            )
            ok = r["max_abs_diff"] <= args.tol and r["top1_agreement"] >= args.min_top1
            print(
                f"max abs logit diff {r['max_abs_diff']:.3e} (tol {args.tol:g}), top-1 agreement "
                f"{r['top1_agreement']:.4f} over {r['positions']} positions"
                + (f" (experts: {r['experts']})" if "experts" in r else "")
                + f": {'OK' if ok else 'FAILED'}"
            )
            return 0 if ok else 1
    except (ConvertError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # needed: verify and Megatron's checkpointing spawn processes
    sys.exit(main())
