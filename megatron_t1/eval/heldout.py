"""Held-out accuracy of an HF-format policy: batched generation with transformers, T1's reward.

pass@1 is the mean over ``n`` samples per problem (greedy when temperature is 0); its standard
error is the standard deviation of the per-problem means over sqrt(number of problems). Answers
are scored by :func:`megatron_t1.reward.compute_rewards` (math-verify), so a response the RL reward
would call correct is what evaluation counts as correct (penalised responses count as wrong).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch


@dataclass
class HeldoutResult:
    """Accuracy over problems, with its standard error and per-response records."""

    accuracy: float
    stderr: float
    num_problems: int
    n_samples: int
    mean_response_tokens: float
    records: list[dict] = field(default_factory=list)


def pass_at_1(correct: list[list[float]]) -> tuple[float, float]:
    """Mean and standard error of per-problem mean correctness (``correct[p][k]`` in {0, 1})."""
    if not correct:
        raise ValueError("no problems")
    means = [sum(c) / len(c) for c in correct]
    m = sum(means) / len(means)
    if len(means) < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in means) / (len(means) - 1)
    return m, math.sqrt(var / len(means))


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    n: int = 1,
    batch_size: int = 64,
    seed: int = 0,
) -> list[list[tuple[str, int, bool]]]:
    """For every chat prompt, ``n`` responses as (text, new tokens, hit the length limit)."""
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    out: list[list[tuple[str, int, bool]]] = [[] for _ in prompts]
    torch.manual_seed(seed)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        kw = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos, num_return_sequences=n)
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:
            kw.update(do_sample=False)
        gen = model.generate(**enc, **kw)
        new = gen[:, enc["input_ids"].shape[1] :]
        for row in range(new.shape[0]):
            ids = new[row].tolist()
            length = next((i + 1 for i, t in enumerate(ids) if t == eos), None)
            truncated = length is None
            ids = ids[: length if length is not None else len(ids)]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            out[start + row // n].append((text, len(ids), truncated))
    return out


def evaluate_hf(
    hf_dir: str | os.PathLike,
    problems: list,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    n: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    reward_config=None,
) -> HeldoutResult:
    """Accuracy of the HF model in ``hf_dir`` on ``problems`` (objects with .question and .answer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_t1.data.synthetic import prompt_messages
    from megatron_t1.reward import compute_rewards

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompts = [prompt_messages(p.question) for p in problems]
    gens = generate(
        model,
        tok,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        n=n,
        batch_size=batch_size,
        seed=seed,
    )
    responses = [g[0] for row in gens for g in row]
    golds = [p.answer for p, row in zip(problems, gens) for _ in row]
    truncated = [g[2] for row in gens for g in row]
    scored = compute_rewards(responses, golds, truncated=truncated, config=reward_config)
    rewards = list(scored.rewards)
    correct, records, i = [], [], 0
    for p, row in zip(problems, gens):
        c = []
        for text, ntok, trunc in row:
            ok = 1.0 if rewards[i] == 1.0 else 0.0
            c.append(ok)
            records.append(
                {
                    "question": p.question,
                    "gold": p.answer,
                    "response": text,
                    "tokens": ntok,
                    "truncated": trunc,
                    "reward": rewards[i],
                    "correct": ok,
                }
            )
            i += 1
        correct.append(c)
    acc, se = pass_at_1(correct)
    mean_tokens = sum(r["tokens"] for r in records) / max(len(records), 1)
    return HeldoutResult(acc, se, len(problems), n, mean_tokens, records)
