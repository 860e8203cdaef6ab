"""Held-out accuracy of a policy (a rollout engine, or an HF folder), scored by T1's reward.

pass@1 is the mean over ``n`` samples per problem (greedy when temperature is 0); its standard
error is the standard deviation of the per-problem means over sqrt(number of problems). Answers
are scored by :func:`megatron_t1.reward.compute_rewards` (math-verify), so a response the RL reward
would call correct is what evaluation counts as correct (penalised responses count as wrong).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from megatron_t1.data.template import DEFAULT_PROMPT_TEMPLATE, render_prompts


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


def problem_prompts(
    tokenizer, problems: list, *, template: str = DEFAULT_PROMPT_TEMPLATE, system: str | None = None
) -> list[str]:
    """The chat-templated prompt of every problem (objects with .question): RL rollouts and held-out
    evaluation use ``data.prompt_template`` / ``data.system_prompt`` (:mod:`megatron_t1.data.template`)."""
    return render_prompts(tokenizer, [p.question for p in problems], template=template, system=system)


def score_heldout(problems: list, gens: list, *, reward_config=None) -> HeldoutResult:
    """Accuracy of ``gens`` (one :class:`~megatron_t1.rollout.engine.PromptCompletions` per problem,
    in order) against the problems' answers, scored by T1's reward (penalised responses are wrong)."""
    from megatron_t1.reward import compute_rewards

    if len(gens) != len(problems):
        raise ValueError(f"{len(gens)} generations for {len(problems)} problems")
    flat = [c for g in gens for c in g.completions]
    golds = [p.answer for p, g in zip(problems, gens) for _ in g.completions]
    scored = compute_rewards(
        [c.text for c in flat], golds, truncated=[c.truncated for c in flat], config=reward_config
    )
    rewards = list(scored.rewards)
    correct, records, i = [], [], 0
    for p, g in zip(problems, gens):
        row = []
        for c in g.completions:
            ok = 1.0 if rewards[i] == 1.0 else 0.0
            row.append(ok)
            records.append(
                {
                    "question": p.question,
                    "gold": p.answer,
                    "response": c.text,
                    "tokens": len(c.token_ids),
                    "truncated": c.truncated,
                    "reward": rewards[i],
                    "correct": ok,
                }
            )
            i += 1
        correct.append(row)
    acc, se = pass_at_1(correct)
    mean_tokens = sum(r["tokens"] for r in records) / max(len(records), 1)
    n = len(gens[0].completions) if gens else 0
    return HeldoutResult(acc, se, len(problems), n, mean_tokens, records)


def evaluate_engine(
    engine,
    problems: list,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    n: int = 1,
    seed: int = 0,
    reward_config=None,
    template: str = DEFAULT_PROMPT_TEMPLATE,
    system: str | None = None,
) -> HeldoutResult:
    """Accuracy of a rollout engine's policy on ``problems`` (objects with .question and .answer).

    Generation goes through the engine's own ``generate`` (the RL loop's sampling path; greedy when
    ``temperature`` is 0), prompts through ``template`` / ``system`` (:mod:`megatron_t1.data.template`).
    """
    from megatron_t1.rollout.engine import SamplingParams

    texts = problem_prompts(engine.tokenizer, problems, template=template, system=system)
    params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=seed)
    return score_heldout(problems, engine.generate(texts, n, params), reward_config=reward_config)


def evaluate_hf(hf_dir: str | os.PathLike, problems: list, **kw) -> HeldoutResult:
    """:func:`evaluate_engine` on the HF folder ``hf_dir`` (model + tokenizer), fp32 on CPU."""
    from megatron_t1.rollout.hf_engine import HFEngine

    engine = HFEngine.from_pretrained(hf_dir)
    try:
        return evaluate_engine(engine, problems, **kw)
    finally:
        engine.close()
