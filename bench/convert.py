"""Checkpoint conversion: wall time vs ``cp`` and peak memory, HF -> mcore -> HF.

    python bench/convert.py                  # ~2.4 GB synthetic Qwen2-shaped model (bf16), TP=2
    python bench/convert.py --layers 4       # smaller, quicker
    python bench/convert.py --arch qwen3_moe --tp 1 --ep 2   # ~1.9 GB synthetic Qwen3-MoE, 1,536 experts

A synthetic model is written as HF safetensors: ``qwen2`` with Qwen2.5-1.5B shapes (hidden 1536,
FFN 8960, 12 query / 2 key-value heads, vocab 151936, untied head; layers chosen to pass 2 GB), or
``qwen3_moe`` with Qwen3-MoE's layout at a smaller width (hidden 1024, 16 query / 4 key-value heads
of 128, q/k norms, 64 experts of 384 per layer, top 8, vocab 151936, untied head, 8 layers: 1.9 GB,
of which 1.2 GB in 1,536 expert tensors of 0.79 MB). Each direction
runs in a fresh subprocess: imports first, then the post-import RSS baseline is taken and the
kernel's peak-RSS counter reset (``/proc/self/clear_refs``), then the timed conversion; the peak
(``VmHWM``) minus the baseline is reported. ``cp -r`` of the same input folder is timed in the same
run (the input is in the page cache for both). Targets: time <= 3x cp per direction; peak RSS above
baseline <= 2x the largest tensor + 0.3 GB. The round trip is checked bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(direction: str, src: str, dst: str, tp: int, ep: int, dtype: str | None) -> None:
    """Run one conversion after imports; print {"seconds", "peak_above_baseline", "baseline"}."""
    import torch

    torch.set_num_threads(1)
    from megatron_t1.convert.offline import hf_to_mcore, mcore_to_hf

    baseline = _rss_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    t0 = time.perf_counter()
    if direction == "hf-to-mcore":
        hf_to_mcore(src, dst, tp=tp, ep=ep, dtype=dtype, progress=False)
    else:
        mcore_to_hf(src, dst, progress=False)
    seconds = time.perf_counter() - t0
    peak = _rss_bytes("VmHWM")
    os.sync()  # and until the output is on disk (what a 64 GB conversion is bound by)
    synced = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "seconds": seconds,
                "synced": synced,
                "peak_above_baseline": peak - baseline,
                "baseline": baseline,
            }
        )
    )


def bench_model_config(arch: str, layers: int):
    """The synthetic model's ModelConfig (shapes in the module docstring)."""
    from megatron_t1.config import ModelConfig

    common = dict(num_layers=layers, vocab_size=151936, max_position_embeddings=4096, rope_theta=1e6)
    if arch == "qwen2":
        return ModelConfig(
            arch="qwen2",
            hidden_size=1536,
            ffn_hidden_size=8960,
            num_attention_heads=12,
            num_query_groups=2,
            add_qkv_bias=True,
            tie_word_embeddings=False,
            **common,
        )
    return ModelConfig(
        arch="qwen3_moe",
        hidden_size=1024,
        ffn_hidden_size=3072,
        num_attention_heads=16,
        num_query_groups=4,
        kv_channels=128,
        add_qkv_bias=False,
        qk_layernorm=True,
        num_experts=64,
        moe_router_topk=8,
        moe_ffn_hidden_size=384,
        tie_word_embeddings=False,
        **common,
    )


def make_model(root: Path, arch: str, layers: int, seed: int = 0) -> tuple[Path, int, int, int]:
    """Write the synthetic HF folder; returns (folder, total bytes, HF tensors, largest tensor bytes)."""
    import torch

    from megatron_t1.convert.hf_io import SafetensorsShardWriter
    from megatron_t1.convert.maps import Dims, expected_hf_shapes
    from megatron_t1.convert.registry import spec_for_arch

    mc = bench_model_config(arch, layers)
    spec = spec_for_arch(arch)
    d = root / "hf"
    d.mkdir(parents=True)
    dims = Dims.of(mc)
    maps = spec.tensor_maps(mc)
    plan = [(n, s, torch.bfloat16) for tm in maps for n, s in zip(tm.hf, expected_hf_shapes(tm, dims))]
    w = SafetensorsShardWriter(d, plan, max_shard_bytes=2**30)
    g = torch.Generator().manual_seed(seed)
    for name, shape, dt in plan:
        w.write(name, (torch.randn(shape, generator=g) * 0.02).to(dt))
    w.finish()
    (d / "config.json").write_text(json.dumps(spec.hf_config(mc, "bfloat16"), indent=2))
    # Megatron's fused tensors (qkv, fc1 = [gate; up]) are larger than their HF parts: count them.
    largest = max(torch.Size(tm.shape).numel() * 2 for tm in maps)
    return d, w.total_bytes, len(plan), largest


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def timed_cp(src: Path, dst: Path) -> tuple[float, float]:
    """(seconds to copy, seconds to copy and sync), starting with no dirty pages."""
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    t1 = time.perf_counter() - t0
    os.sync()
    return t1, time.perf_counter() - t0


def run_worker(direction: str, src: Path, dst: Path, tp: int, ep: int, dtype: str = "none") -> dict:
    os.sync()
    out = subprocess.run(
        [sys.executable, __file__, "--worker", direction, str(src), str(dst), str(tp), str(ep), dtype],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_tensors(a: Path, b: Path) -> bool:
    import torch

    from megatron_t1.convert.hf_io import SafetensorsReader

    ra, rb = SafetensorsReader(a), SafetensorsReader(b)
    if sorted(ra.names()) != sorted(rb.names()):
        return False
    return all(torch.equal(ra.get(n), rb.get(n)) for n in ra.names())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["qwen2", "qwen3_moe"], default="qwen2", help="synthetic model family")
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="decoder layers (default 16 for qwen2: ~2.4 GB; 8 for qwen3_moe)",
    )
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--ep", type=int, default=1, help="expert parallel size hf-to-mcore checks (qwen3_moe)")
    p.add_argument(
        "--reps", type=int, default=3, help="repetitions (medians are reported: the page cache is noisy)"
    )
    p.add_argument(
        "--dtype-path",
        action="store_true",
        help="also time HF -> mcore with --dtype fp32 (the tensor path: tensors pass through memory)",
    )
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, deleted)")
    p.add_argument(
        "--worker", nargs=6, metavar=("DIRECTION", "SRC", "DST", "TP", "EP", "DTYPE"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.worker:
        direction, src, dst, tp, ep, dtype = args.worker
        worker(direction, src, dst, int(tp), int(ep), None if dtype == "none" else dtype)
        return
    layers = args.layers or (16 if args.arch == "qwen2" else 8)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        hf, total, n_tensors, largest = make_model(root, args.arch, layers)
        runs: dict[str, list[tuple[dict, tuple[float, float]]]] = {}
        layout = f"TP={args.tp}" + (f", EP={args.ep}" if args.ep > 1 else "")
        cases = [
            (f"HF -> mcore ({layout})", hf, "mcore", "hf-to-mcore", "none"),
            ("mcore -> HF", None, "hf_out", "mcore-to-hf", "none"),
        ]
        if args.dtype_path:
            cases.append(("HF -> mcore, bf16->fp32", hf, "mcore32", "hf-to-mcore", "fp32"))
        ok = True
        for _ in range(args.reps):
            for name, src, dst, direction, dtype in cases:
                src = src or root / "mcore"
                cp = timed_cp(src, root / "copy")
                r = run_worker(direction, src, root / dst, args.tp, args.ep, dtype)
                runs.setdefault(name, []).append((r, cp, folder_bytes(src)))
                shutil.rmtree(root / "copy")
            ok = ok and same_tensors(hf, root / "hf_out")
            for _, _, dst, _, _ in cases:
                shutil.rmtree(root / dst)
        budget = 2 * largest + 0.3 * GB
        print(
            f"model: {args.arch}, {total / GB:.2f} GB bf16, {layers} layers, {n_tensors} HF tensors, "
            f"largest tensor {largest / GB:.3f} GB "
            f"(peak budget 2x + 0.3 = {budget / GB:.3f} GB); round trip bitwise identical: {ok}"
        )
        print(
            f"medians of {args.reps} runs (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores); "
            "page cache: output written, not yet on disk; +sync: until on disk"
        )
        print(
            f"{'direction':<24} {'in GB':>6} | {'page cache: s':>13} {'cp s':>6} {'x cp':>5} | "
            f"{'+sync: s':>8} {'cp s':>6} {'x cp':>5} | {'peak GB':>7}"
        )
        med = statistics.median
        for name, rs in runs.items():
            t, c = med(r["seconds"] for r, _, _ in rs), med(cp[0] for _, cp, _ in rs)
            ts, cs = med(r["synced"] for r, _, _ in rs), med(cp[1] for _, cp, _ in rs)
            x, xs = med(r["seconds"] / cp[0] for r, cp, _ in rs), med(r["synced"] / cp[1] for r, cp, _ in rs)
            peak = max(r["peak_above_baseline"] for r, _, _ in rs) / GB
            print(
                f"{name:<24} {rs[0][2] / GB:6.2f} | {t:13.2f} {c:6.2f} {x:5.2f} | "
                f"{ts:8.2f} {cs:6.2f} {xs:5.2f} | {peak:7.3f}"
            )
        if not ok:
            sys.exit("round trip differs")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
