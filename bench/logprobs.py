"""Benchmark: token log-prob + full-vocabulary entropy, naive vs chunked vs fused output layer.

    python bench/logprobs.py                       # 4096 tokens x 32768 vocab, H = 1024, fp32, 3 rounds
    python bench/logprobs.py --tokens 1024 --vocab 8192 --hidden 256 --rounds 1   # quick look
    python bench/logprobs.py --device cuda --dtype bf16 --tokens 16384 --vocab 151936 --hidden 5120

Every measurement runs in a fresh subprocess (``--worker VARIANT``), so one variant's allocator state
cannot hide another's peak. Peak memory on CPU is the process's resident-set high-water mark (VmHWM of
/proc/self/status), reset just before the measured calls by writing 5 to /proc/self/clear_refs: torch's
CPU allocator is plain malloc, which tracemalloc does not see and torch does not count. On CUDA it is
torch.cuda.max_memory_allocated. "Extra peak" is that peak minus the memory held once the inputs are
built, i.e. everything the variant allocates, outputs and gradients included. Variants run alternately in
each round (naive, chunked, ...) and the table reports the median time over rounds, so that load from
other processes on a shared machine hits all variants alike. Errors are max |difference| to a float64
reference computed row block by row block (textbook log_softmax + softmax, autograd) after the timed
calls, in the first round, on the same (possibly bf16) inputs.

Worker processes get OMP_WAIT_POLICY=PASSIVE unless ``--omp-wait-policy`` says otherwise (or it is set
already): on a shared, oversubscribed CPU, libgomp's default spin-waiting threads take the core from the
thread doing the work, and code made of many short parallel regions (the chunked loop) stalls: 2-thread
chunked forward 5.3-6.0 s with the default vs 0.22-0.26 s with PASSIVE, same box, same minute; the
naive path (few long regions) was unaffected (1.0-1.2 s). One thread has no waiting threads at all.

Variants (L = T x V x 4 bytes, the size of fp32 logits):
  naive           log_softmax + gather + softmax entropy (in fp32) on materialised logits, fwd + bwd
  chunked         token_logprobs_and_entropy, forward and backward (the gradient itself is L)
  chunked_nograd  token_logprobs_and_entropy under torch.no_grad (the anchor's pass)
  naive_linear    logits = hidden @ weight^T, then naive (the unfused output layer), fwd + bwd
  fused           fused_token_logprobs_and_entropy(hidden, weight), fwd + bwd
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_t1.rl.fused import fused_token_logprobs_and_entropy  # noqa: E402
from megatron_t1.rl.logprobs import token_logprobs_and_entropy  # noqa: E402

VARIANTS = ("naive", "chunked", "chunked_nograd", "naive_linear", "fused")
LOGIT_STD = 3.0  # typical LM logits spread; keeps softmax neither flat nor one-hot
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


class _Peak:
    """Peak memory above the baseline at construction: CUDA allocator stats, or the RSS high-water mark."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
            self.base = _status_kib("VmRSS") * 1024

    def extra_bytes(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status_kib("VmHWM") * 1024 - self.base


def _naive(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    probs = torch.softmax(logits.float(), dim=-1)
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(probs * logp_all).sum(-1)


def _inputs(args: argparse.Namespace, variant: str, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(1234)
    t, v, h, dtype = args.tokens, args.vocab, args.hidden, DTYPES[args.dtype]
    kw = dict(generator=g, device=device)
    out = {
        "targets": torch.randint(0, v, (t,), **kw),
        "g_lp": torch.randn(t, **kw),
        "g_H": torch.randn(t, **kw),
    }
    if variant in ("naive_linear", "fused"):
        out["hidden"] = torch.randn(t, h, **kw).to(dtype)
        out["weight"] = (torch.randn(v, h, **kw) * (LOGIT_STD / h**0.5)).to(dtype)
    else:
        out["logits"] = (torch.randn(t, v, **kw) * LOGIT_STD).to(dtype)
    return out


def _run(variant: str, x: dict[str, torch.Tensor], chunk_size: int | None) -> dict[str, torch.Tensor]:
    """One forward (+ backward) of ``variant``; returns outputs and gradients (kept alive for the peak)."""
    tgt, g_lp, g_H = x["targets"], x["g_lp"], x["g_H"]
    if variant == "chunked_nograd":
        with torch.no_grad():
            lp, ent = token_logprobs_and_entropy(x["logits"], tgt, chunk_size=chunk_size)
        return {"lp": lp, "H": ent}
    leaves = [x["logits"]] if "logits" in x else [x["hidden"], x["weight"]]
    for leaf in leaves:
        leaf.requires_grad_(True)
        leaf.grad = None
    if variant == "naive":
        lp, ent = _naive(x["logits"], tgt)
    elif variant == "chunked":
        lp, ent = token_logprobs_and_entropy(x["logits"], tgt, chunk_size=chunk_size)
    elif variant == "naive_linear":
        lp, ent = _naive(x["hidden"] @ x["weight"].t(), tgt)
    elif variant == "fused":
        lp, ent = fused_token_logprobs_and_entropy(x["hidden"], x["weight"], tgt, chunk_size=chunk_size)
    else:
        raise ValueError(variant)
    (lp * g_lp + ent * g_H).sum().backward()
    out = {"lp": lp.detach(), "H": ent.detach()}
    for name, leaf in zip(["grad"] if "logits" in x else ["grad_hidden", "grad_weight"], leaves):
        out[name] = leaf.grad
    return out


def _errors(x: dict[str, torch.Tensor], out: dict[str, torch.Tensor], block: int = 256) -> dict[str, float]:
    """Max |out - reference| with a float64 textbook reference, computed row block by row block."""
    err = {k: 0.0 for k in out}
    linear = "hidden" in x
    w64 = x["weight"].detach().double().requires_grad_(True) if linear else None
    n = x["targets"].shape[0]
    for r0 in range(0, n, block):
        sl = slice(r0, min(n, r0 + block))
        if linear:
            h64 = x["hidden"].detach()[sl].double().requires_grad_(True)
            logits64 = h64 @ w64.t()
        else:
            leaf = x["logits"].detach()[sl].double().requires_grad_(True)
            logits64 = leaf
        logp_all = torch.log_softmax(logits64, dim=-1)
        lp = logp_all.gather(-1, x["targets"][sl].unsqueeze(-1)).squeeze(-1)
        ent = -(torch.softmax(logits64, dim=-1) * logp_all).sum(-1)
        if "grad" in out or "grad_hidden" in out:
            (lp * x["g_lp"][sl].double() + ent * x["g_H"][sl].double()).sum().backward()
        err["lp"] = max(err["lp"], (out["lp"][sl].double() - lp.detach()).abs().max().item())
        err["H"] = max(err["H"], (out["H"][sl].double() - ent.detach()).abs().max().item())
        if "grad" in out:
            err["grad"] = max(err["grad"], (out["grad"][sl].double() - leaf.grad).abs().max().item())
        if "grad_hidden" in out:
            err["grad_hidden"] = max(
                err["grad_hidden"], (out["grad_hidden"][sl].double() - h64.grad).abs().max().item()
            )
        del logp_all, logits64
    if "grad_weight" in out:
        err["grad_weight"] = (out["grad_weight"].double() - w64.grad).abs().max().item()
    return err


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    x = {k: v.contiguous() for k, v in _inputs(args, args.worker, device).items()}
    gc.collect()
    peak = _Peak(device)
    times, out = [], None
    result: dict = {"variant": args.worker}
    try:
        for _ in range(args.reps):
            out = None  # free the previous outputs and gradients before the next call
            gc.collect()
            _sync(device)
            t0 = time.perf_counter()
            out = _run(args.worker, x, args.chunk_size)
            _sync(device)
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        out = None
        result |= {"oom": True, "extra_peak_mib": peak.extra_bytes() / 2**20}
        print("RESULT " + json.dumps(result))
        return
    grads = [out[k] for k in ("grad_hidden", "grad_weight") if k in out]
    result |= {
        "time_s": min(times),
        "extra_peak_mib": peak.extra_bytes() / 2**20,
        "input_grads_mib": sum(g.numel() * g.element_size() for g in grads) / 2**20,
    }
    if args.errors:
        result["errors"] = _errors(x, out)
    print("RESULT " + json.dumps(result))


def _summarise(runs: dict[str, list[dict]], args: argparse.Namespace) -> None:
    size_l = args.tokens * args.vocab * 4 / 2**20
    summary = {}
    for v, rs in runs.items():
        ok = [r for r in rs if not r.get("oom")]
        summary[v] = {
            "oom": not ok,
            "time_s": statistics.median(r["time_s"] for r in ok) if ok else float("nan"),
            "extra_peak_mib": max(r["extra_peak_mib"] for r in rs),
            "input_grads_mib": ok[0]["input_grads_mib"] if ok else 0.0,
            "errors": ok[0].get("errors", {}) if ok else {},
        }
    base = {"chunked": "naive", "chunked_nograd": "naive", "fused": "naive_linear", "naive_linear": "naive"}
    threads = (
        f"{args.threads} CPU threads, OMP_WAIT_POLICY={args.omp_wait_policy}"
        if args.device == "cpu"
        else torch.cuda.get_device_name()
    )
    print(
        f"\nlogits [{args.tokens}, {args.vocab}] {args.dtype}, L = T x V x 4 B = {size_l:.0f} MiB; hidden "
        f"{args.hidden}; {args.device} ({threads}); torch {torch.__version__}; "
        f"median of {args.rounds} rounds\n"
    )
    print(
        "| variant | time s | time / baseline (median of per-round ratios) | extra peak MiB | extra / L "
        "| beyond input grads / L | err logp | err H | err grad |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for v, s in summary.items():
        b = base.get(v)
        e = s["errors"]
        if s["oom"]:
            print(f"| {v} | OOM | - | > {s['extra_peak_mib']:.0f} | - | - | - | - | - |")
            continue
        ratio = "-"
        if b in runs and not summary[b]["oom"]:
            # Paired: the two ran back to back in each round, so the ratio of a round cancels slow periods.
            pairs = [
                x["time_s"] / y["time_s"] for x, y in zip(runs[v], runs[b]) if "time_s" in x and "time_s" in y
            ]
            ratio = f"{statistics.median(pairs):.2f}x {b}"
        beyond = (s["extra_peak_mib"] - s["input_grads_mib"]) / size_l
        g = max((e.get(k, 0.0) for k in ("grad", "grad_hidden", "grad_weight")), default=0.0)
        print(
            f"| {v} | {s['time_s']:.3f} | {ratio} | {s['extra_peak_mib']:.1f} | "
            f"{s['extra_peak_mib'] / size_l:.3f} | {beyond:.3f} | {e.get('lp', float('nan')):.2e} | "
            f"{e.get('H', float('nan')):.2e} | {g:.2e} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="logits / hidden / weight dtype")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=2, help="calls per worker process; the fastest is kept")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: automatic)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument(
        "--omp-wait-policy",
        choices=["PASSIVE", "ACTIVE", "inherit"],
        default="PASSIVE",
        help="OMP_WAIT_POLICY of the worker processes (inherit: leave the environment as it is)",
    )
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--errors", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    variants = args.variants.split(",")
    env = dict(os.environ)
    if args.omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy  # read by libgomp when a worker starts
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            cmd = (
                [sys.executable, __file__, "--worker", v, "--errors"]
                if r == 0
                else [sys.executable, __file__, "--worker", v]
            )
            for flag in ("tokens", "vocab", "hidden", "dtype", "device", "reps", "threads", "chunk_size"):
                value = getattr(args, flag)
                if value is not None:
                    cmd += ["--" + flag.replace("_", "-"), str(value)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"worker {v} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
            res = json.loads(lines[-1][len("RESULT ") :])
            runs[v].append(res)
            what = "OOM" if res.get("oom") else f"{res['time_s']:.3f} s"
            print(f"round {r} {v}: {what}, {res['extra_peak_mib']:.1f} MiB", file=sys.stderr, flush=True)
    _summarise(runs, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        raw = {"args": vars(args) | {"json": str(args.json)}, "runs": runs}
        args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
