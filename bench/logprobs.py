"""Benchmark: token log-prob + full-vocabulary entropy, naive vs chunked vs fused output layer.

    python bench/logprobs.py                       # 4096 tokens x 32768 vocab, H = 1024, 3 rounds
    python bench/logprobs.py --tokens 1024 --vocab 8192 --hidden 256 --rounds 1   # quick look

Every measurement runs in a fresh subprocess (``--worker VARIANT``), so one variant's allocator state
cannot hide another's peak. Peak memory is the process's resident-set high-water mark (VmHWM of
/proc/self/status), reset just before the measured call by writing 5 to /proc/self/clear_refs; torch's
CPU allocator is plain malloc, which neither tracemalloc nor torch.cuda.memory_* sees. "Extra peak" is
that high-water mark minus the resident set after the inputs are built, i.e. everything the variant
allocates (outputs and gradients included). Variants run alternately in each round (naive, chunked, ...)
and the table reports the median time over rounds, so that load from other processes on a shared machine
hits all variants alike. Errors are max |difference| to a float64 reference computed row block by row
block (textbook log_softmax + softmax, autograd) after the measured call, in the first round.

Variants (L = T x V x 4 bytes, the fp32 logits):
  naive           log_softmax + gather + softmax entropy on materialised logits, forward and backward
  chunked_nograd  token_logprobs_and_entropy under torch.no_grad (the anchor's pass)
  chunked         token_logprobs_and_entropy, forward and backward (the gradient itself is L)
  naive_linear    logits = hidden @ weight^T, then naive (the unfused output layer), forward and backward
  fused           fused_token_logprobs_and_entropy(hidden, weight), forward and backward
"""

from __future__ import annotations

import argparse
import gc
import json
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


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)


def _naive(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    probs = torch.softmax(logits.float(), dim=-1)
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(probs * logp_all).sum(-1)


def _inputs(args: argparse.Namespace, variant: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    t, v, h = args.tokens, args.vocab, args.hidden
    out = {
        "targets": torch.randint(0, v, (t,), generator=g),
        "g_lp": torch.randn(t, generator=g),
        "g_H": torch.randn(t, generator=g),
    }
    if variant in ("naive_linear", "fused"):
        out["hidden"] = torch.randn(t, h, generator=g)
        out["weight"] = torch.randn(v, h, generator=g) * (LOGIT_STD / h**0.5)
    else:
        out["logits"] = torch.randn(t, v, generator=g) * LOGIT_STD
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
    if "grad_weight" in out:
        err["grad_weight"] = (out["grad_weight"].double() - w64.grad).abs().max().item()
    return err


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    x = _inputs(args, args.worker)
    x = {k: v.contiguous() for k, v in x.items()}
    gc.collect()
    _reset_peak()
    rss0 = _status_kib("VmRSS")
    times = []
    out = None
    for _ in range(args.reps):
        out = None  # free the previous outputs and gradients before the next call
        gc.collect()
        t0 = time.perf_counter()
        out = _run(args.worker, x, args.chunk_size)
        times.append(time.perf_counter() - t0)
    extra_kib = _status_kib("VmHWM") - rss0
    grads = [out[k] for k in ("grad_hidden", "grad_weight") if k in out]
    input_grads = sum(g.numel() * g.element_size() for g in grads)
    result = {
        "variant": args.worker,
        "time_s": min(times),
        "extra_peak_mib": extra_kib / 1024,
        "input_grads_mib": input_grads / 2**20,
    }
    if args.errors:
        result["errors"] = _errors(x, out)
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=2, help="calls per worker process; the fastest is kept")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: automatic)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--errors", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    variants = args.variants.split(",")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                v,
                "--tokens",
                str(args.tokens),
                "--vocab",
                str(args.vocab),
                "--hidden",
                str(args.hidden),
                "--reps",
                str(args.reps),
                "--threads",
                str(args.threads),
            ]
            if args.chunk_size:
                cmd += ["--chunk-size", str(args.chunk_size)]
            if r == 0:
                cmd.append("--errors")
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"worker {v} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
            runs[v].append(json.loads(lines[-1][len("RESULT ") :]))
            print(
                f"round {r} {v}: {runs[v][-1]['time_s']:.3f} s, {runs[v][-1]['extra_peak_mib']:.1f} MiB",
                file=sys.stderr,
            )

    size_l = args.tokens * args.vocab * 4 / 2**20
    summary = {}
    for v, rs in runs.items():
        summary[v] = {
            "time_s": statistics.median(r["time_s"] for r in rs),
            "extra_peak_mib": max(r["extra_peak_mib"] for r in rs),
            "input_grads_mib": rs[0]["input_grads_mib"],
            "errors": rs[0].get("errors", {}),
        }
    base = {"chunked": "naive", "chunked_nograd": "naive", "fused": "naive_linear", "naive_linear": "naive"}
    print(
        f"\nlogits [{args.tokens}, {args.vocab}] fp32, L = {size_l:.0f} MiB; hidden {args.hidden}; "
        f"{args.threads} threads; torch {torch.__version__}; median of {args.rounds} rounds\n"
    )
    print(
        "| variant | time s | time / baseline | extra peak MiB | extra / L | beyond input grads / L "
        "| err logp | err H | err grad |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for v, s in summary.items():
        b = base.get(v)
        ratio = f"{s['time_s'] / summary[b]['time_s']:.2f}x {b}" if b in summary else "-"
        beyond = (s["extra_peak_mib"] - s["input_grads_mib"]) / size_l
        e = s["errors"]
        g = max((e.get(k, 0.0) for k in ("grad", "grad_hidden", "grad_weight")), default=0.0)
        print(
            f"| {v} | {s['time_s']:.3f} | {ratio} | {s['extra_peak_mib']:.1f} | "
            f"{s['extra_peak_mib'] / size_l:.3f} | {beyond:.3f} | {e.get('lp', float('nan')):.2e} | "
            f"{e.get('H', float('nan')):.2e} | {g:.2e} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        raw = {"args": vars(args) | {"json": str(args.json)}, "runs": runs}
        args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
