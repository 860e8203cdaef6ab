"""Inference scaling (T1, arXiv 2501.11651, Sec. 4 / Fig. 1): accuracy as a function of the thinking
budget N, with no verifier and no majority vote.

Protocol. Generate once with a large budget (the samples of the plain evaluation are reused). For
each budget N of a sweep and each sample y (response token ids ``y_1..y_L``):

* ``T`` = the number of *thinking tokens*: response tokens before the first ``</think>`` (the
  opening ``<think>`` counts; a sample that never closes its thinking has ``T = L``).
* If its thinking fits in the budget (``T <= N``) and the generation limit did not stop it (it
  closed its thinking, or ended with EOS without closing it), the sample stands as it is: nothing
  was cut, its own answer (or lack of one) is scored.
* Otherwise (``T > N``, or the sample hit the generation limit while still thinking) keep exactly
  the first ``m = min(N, T)`` thinking tokens and run a **summarising pass**: the prompt, then
  ``y_1..y_m``, then the closing text of :func:`megatron_t1.data.synthetic.close_thinking`
  (``"\\n</think>\\n"``), and the summariser (the same policy, or a given summariser model)
  continues greedily with the answer line, which is scored by T1's reward. This is exactly the
  layout of the SFT's answer-from-truncated-thinking examples, so the policy has seen it.

So at the largest budget (= the generation limit) the sweep differs from plain pass@1 only on
samples that ran out of tokens while thinking: they get an answer from the summariser instead of
the over-long penalty.

With the policy as summariser the truncated thinking goes in as the *same token ids* (no re-
tokenisation at the cut). A separate summariser with another tokenizer gets the decoded text.

Per budget the table reports pass@1 (mean over samples, then problems), its standard error, the mean
tokens used (thinking kept + closing text + answer, or the whole response when it was not cut) and
the share of samples that needed a summarising pass. Summaries of the same cut are generated once
(a sample cut at its full length L has the same cut for every N >= L).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from megatron_t1.data.synthetic import THINK_CLOSE, close_thinking
from megatron_t1.data.template import prompt_messages
from megatron_t1.eval.benchmark import score_records, summarise
from megatron_t1.eval.loaders import EvalProblem

__all__ = [
    "SCALING_COLUMNS",
    "Summariser",
    "budget_sweep",
    "summary_prompt",
    "thinking_length",
]

SCALING_COLUMNS = (
    "checkpoint",
    "benchmark",
    "budget",
    "accuracy",
    "stderr",
    "mean_tokens",
    "mean_thinking_tokens",
    "summarised",
    "num_problems",
    "n_samples",
)


def thinking_length(token_ids: Sequence[int], tokenizer, marker: str = THINK_CLOSE) -> tuple[int, bool]:
    """``(T, closed)``: response tokens before the first ``marker``; ``closed`` is False (and
    ``T = len(token_ids)``) when the marker never appears.

    When the marker is one token of the vocabulary (ours, Qwen3, DeepSeek-R1 tokenizers) it is
    found by id. Otherwise the decoded text is searched and ``T`` is the largest prefix whose
    decoding ends at or before the marker's first character (binary search over prefixes).
    """
    ids = list(token_ids)
    marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    if len(marker_ids) == 1:
        try:
            return ids.index(marker_ids[0]), True
        except ValueError:
            return len(ids), False
    text = tokenizer.decode(ids, skip_special_tokens=False)
    cut = text.find(marker)
    if cut < 0:
        return len(ids), False
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=False)) <= cut:
            lo = mid
        else:
            hi = mid - 1
    return lo, True


@dataclass
class Summariser:
    """Who writes the answer from truncated thinking.

    Attributes:
        engine: a :class:`~megatron_t1.rollout.engine.RolloutEngine`.
        tokenizer: its tokenizer (chat template, encoding of the closing text).
        same_tokenizer: the summariser reads the policy's token ids (True for the policy itself);
            False sends the decoded thinking as text under its own chat template.
        system: optional system message of the prompt template.
    """

    engine: object
    tokenizer: object
    same_tokenizer: bool = True
    system: str | None = None


def summary_prompt(
    summariser: Summariser,
    problem: EvalProblem,
    prompt_ids: Sequence[int],
    thinking_ids: Sequence[int],
    policy_tokenizer,
) -> tuple[list[int], str, int]:
    """The summarising pass's prompt for one truncated sample.

    Args:
        summariser: see :class:`Summariser`.
        problem: the problem (its question, for a summariser with its own chat template).
        prompt_ids: the policy's prompt token ids (chat template + generation prompt).
        thinking_ids: the ``m`` kept thinking tokens (policy ids).
        policy_tokenizer: decodes ``thinking_ids``.

    Returns:
        ``(ids, prefix_text, n_close)``: the prompt ids; the assistant text so far (truncated
        thinking + closing text: the scored response is ``prefix_text + answer``); the number of
        tokens of the closing text.
    """
    partial = policy_tokenizer.decode(list(thinking_ids), skip_special_tokens=False)
    closed = close_thinking(partial)
    tok = summariser.tokenizer
    close_ids = tok(closed[len(partial) :], add_special_tokens=False)["input_ids"]
    if summariser.same_tokenizer:
        ids = list(prompt_ids) + list(thinking_ids) + close_ids
    else:
        msgs = prompt_messages(problem.question, system=summariser.system)
        head = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = (
            tok(head, add_special_tokens=False)["input_ids"]
            + tok(partial, add_special_tokens=False)["input_ids"]
            + close_ids
        )
    return ids, closed, len(close_ids)


def budget_sweep(
    problems: Sequence[EvalProblem],
    completions: Sequence,
    policy_tokenizer,
    budgets: Sequence[int],
    scorer,
    summariser: Summariser,
    *,
    summary_params,
    checkpoint: str,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Run the budget sweep on existing samples (see the module docstring).

    Args:
        problems: the P problems.
        completions: P :class:`~megatron_t1.rollout.engine.PromptCompletions` (prompt ids and n
            samples each) from the large-budget generation.
        policy_tokenizer: the policy's tokenizer.
        budgets: thinking budgets N (tokens, >= 1), e.g. ``[256, 512, ..., 16384]``.
        scorer: a :class:`~megatron_t1.reward.RewardScorer`.
        summariser: who answers from the truncated thinking.
        summary_params: :class:`~megatron_t1.rollout.engine.SamplingParams` of the summarising
            pass (greedy, a short ``max_tokens``).
        checkpoint: label of the policy (table and plot).

    Returns:
        ``(rows, records)``: one row per budget (:data:`SCALING_COLUMNS`) and one record per
        (budget, problem, sample) with ``budget``, ``thinking_tokens``, ``summarised`` and as
        ``response`` the summariser's text after the truncated thinking (None for a sample that
        stands: its text is the plain evaluation's record of the same sample).
    """
    budgets = sorted(set(int(b) for b in budgets))
    if not budgets or budgets[0] < 1:
        raise ValueError(f"budgets must be >= 1 tokens, got {budgets}")
    if len(completions) != len(problems):
        raise ValueError(f"{len(completions)} completions for {len(problems)} problems")
    think = [[thinking_length(c.token_ids, policy_tokenizer) for c in pc.completions] for pc in completions]
    # cut_at(p, k, N): the thinking tokens kept at budget N, or None when the sample stands as it is:
    # its thinking fits in N and it was not stopped by the generation limit (it closed its thinking,
    # or ended with EOS without closing it, which no budget changes).
    cut_needed = [
        [(t, not closed and c.truncated) for (t, closed), c in zip(think[pi], pc.completions, strict=True)]
        for pi, pc in enumerate(completions)
    ]

    def cut_at(pi: int, k: int, budget: int) -> int | None:
        t, hit_limit = cut_needed[pi][k]
        return min(budget, t) if (t > budget or hit_limit) else None

    cache: dict[tuple[int, int, int], tuple[str, str, int, bool]] = {}  # (p, k, m) -> summary outcome
    rows, all_records = [], []
    for budget in budgets:
        todo: dict[tuple[int, int, int], None] = {}  # insertion-ordered set
        for pi in range(len(completions)):
            for k in range(len(think[pi])):
                m = cut_at(pi, k, budget)
                if m is not None and (pi, k, m) not in cache:
                    todo[(pi, k, m)] = None
        if todo:
            if progress is not None:
                progress(
                    f"{checkpoint} / {problems[0].benchmark}: budget {budget}: {len(todo)} summarising passes"
                )
            prompts, heads, n_close = [], [], []
            for pi, k, m in todo:
                pc = completions[pi]
                ids, head, nc = summary_prompt(
                    summariser,
                    problems[pi],
                    pc.prompt_token_ids,
                    pc.completions[k].token_ids[:m],
                    policy_tokenizer,
                )
                prompts.append(ids)
                heads.append(head)
                n_close.append(nc)
            outs = summariser.engine.generate(prompts, 1, summary_params)
            for key, head, nc, out in zip(list(todo), heads, n_close, outs, strict=True):
                c = out.completions[0]
                cache[key] = (head, c.text, key[2] + nc + len(c.token_ids), c.truncated)
        texts, trunc, toks, extra = [], [], [], []
        for pi, pc in enumerate(completions):
            rt, rtr, rto, rex = [], [], [], []
            for k, c in enumerate(pc.completions):
                m = cut_at(pi, k, budget)
                if m is None:
                    rt.append(c.text)
                    rtr.append(c.truncated)
                    rto.append(len(c.token_ids))
                    rex.append({"budget": budget, "thinking_tokens": think[pi][k][0], "summarised": False})
                else:
                    head, summary, used, tr = cache[(pi, k, m)]
                    rt.append(head + summary)
                    rtr.append(tr)
                    rto.append(used)
                    rex.append(
                        {
                            "budget": budget,
                            "thinking_tokens": m,
                            "summarised": True,
                            "summary": summary,
                        }
                    )
            texts.append(rt)
            trunc.append(rtr)
            toks.append(rto)
            extra.append(rex)
        records = score_records(
            problems, texts, scorer, truncated=trunc, tokens=toks, checkpoint=checkpoint, extra=extra
        )
        # Keep the audit file small: the thinking (and a sample that stands) is in the plain
        # evaluation's responses.jsonl under the same (checkpoint, problem_id, sample).
        for r in records:
            r["response"] = r.pop("summary") if r["summarised"] else None
        res = summarise(records, checkpoint=checkpoint, benchmark=problems[0].benchmark)
        rows.append(
            {
                "checkpoint": checkpoint,
                "benchmark": problems[0].benchmark,
                "budget": budget,
                "accuracy": res.overall.accuracy,
                "stderr": res.overall.stderr,
                "mean_tokens": res.overall.mean_tokens,
                "mean_thinking_tokens": sum(r["thinking_tokens"] for r in records) / len(records),
                "summarised": sum(r["summarised"] for r in records) / len(records),
                "num_problems": res.overall.num_problems,
                "n_samples": res.n_samples,
            }
        )
        all_records.extend(records)
    return rows, all_records
