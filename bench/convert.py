"""Checkpoint conversion: wall time vs ``cp`` and peak memory, HF -> mcore (TP=2) -> HF.

    python bench/convert.py                  # ~2.4 GB synthetic Qwen2-shaped model (bf16)
    python bench/convert.py --layers 4       # smaller, quicker

A synthetic model with Qwen2.5-1.5B shapes (hidden 1536, FFN 8960, 12 query / 2 key-value heads,
vocab 151936, untied head; layers chosen to pass 2 GB) is written as HF safetensors. Each direction
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


def worker(direction: str, src: str, dst: str, tp: int, dtype: str | None) -> None:
    """Run one conversion after imports; print {"seconds", "peak_above_baseline", "baseline"}."""
    import torch

    torch.set_num_threads(1)
    from megatron_t1.convert.offline import hf_to_mcore, mcore_to_hf

    baseline = _rss_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    t0 = time.perf_counter()
    if direction == "hf-to-mcore":
        hf_to_mcore(src, dst, tp=tp, dtype=dtype, progress=False)
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


def make_model(root: Path, layers: int, seed: int = 0) -> tuple[Path, int, int]:
    """Write the synthetic HF folder; returns (folder, total bytes, largest tensor bytes)."""
    import torch

    from megatron_t1.config import ModelConfig
    from megatron_t1.convert.hf_io import SafetensorsShardWriter
    from megatron_t1.convert.qwen2 import SPEC, hf_config

    mc = ModelConfig(
        arch="qwen2",
        num_layers=layers,
        hidden_size=1536,
        ffn_hidden_size=8960,
        num_attention_heads=12,
        num_query_groups=2,
        vocab_size=151936,
        max_position_embeddings=4096,
        rope_theta=1e6,
        add_qkv_bias=True,
        tie_word_embeddings=False,
    )
    d = root / "hf"
    d.mkdir(parents=True)
    from megatron_t1.convert.maps import Dims, expected_hf_shapes

    dims = Dims.of(mc)
    plan = [
        (n, s, torch.bfloat16)
        for tm in SPEC.tensor_maps(mc)
        for n, s in zip(tm.hf, expected_hf_shapes(tm, dims))
    ]
    w = SafetensorsShardWriter(d, plan, max_shard_bytes=2**30)
    g = torch.Generator().manual_seed(seed)
    for name, shape, dt in plan:
        w.write(name, (torch.randn(shape, generator=g) * 0.02).to(dt))
    w.finish()
    (d / "config.json").write_text(json.dumps(hf_config(mc, "bfloat16"), indent=2))
    largest = max(torch.Size(s).numel() * 2 for _, s, _ in plan)
    # Megatron's fused tensors (qkv, fc1 = [gate; up]) are larger than any HF part: count them too.
    largest = max(largest, 2 * mc.ffn_hidden_size * mc.hidden_size * 2)
    return d, w.total_bytes, largest


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


def run_worker(direction: str, src: Path, dst: Path, tp: int, dtype: str = "none") -> dict:
    os.sync()
    out = subprocess.run(
        [sys.executable, __file__, "--worker", direction, str(src), str(dst), str(tp), dtype],
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
    p.add_argument("--layers", type=int, default=16, help="decoder layers (16: ~2.4 GB)")
    p.add_argument("--tp", type=int, default=2)
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
        "--worker", nargs=5, metavar=("DIRECTION", "SRC", "DST", "TP", "DTYPE"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.worker:
        direction, src, dst, tp, dtype = args.worker
        worker(direction, src, dst, int(tp), None if dtype == "none" else dtype)
        return
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        hf, total, largest = make_model(root, args.layers)
        runs: dict[str, list[tuple[dict, tuple[float, float]]]] = {}
        cases = [
            ("HF -> mcore (TP=2)", hf, "mcore", "hf-to-mcore", "none"),
            ("mcore -> HF", None, "hf_out", "mcore-to-hf", "none"),
        ]
        if args.dtype_path:
            cases.append(("HF -> mcore, bf16->fp32", hf, "mcore32", "hf-to-mcore", "fp32"))
        ok = True
        for _ in range(args.reps):
            for name, src, dst, direction, dtype in cases:
                src = src or root / "mcore"
                cp = timed_cp(src, root / "copy")
                r = run_worker(direction, src, root / dst, args.tp, dtype)
                runs.setdefault(name, []).append((r, cp, folder_bytes(src)))
                shutil.rmtree(root / "copy")
            ok = ok and same_tensors(hf, root / "hf_out")
            for _, _, dst, _, _ in cases:
                shutil.rmtree(root / dst)
        budget = 2 * largest + 0.3 * GB
        print(
            f"model: {total / GB:.2f} GB bf16, {args.layers} layers, largest tensor {largest / GB:.3f} GB "
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
