"""pass@1 on a benchmark: sample n responses per problem with a rollout engine, score them with T1's
reward, and summarise per benchmark, per subject and per difficulty.

pass@1 of a problem set P with n samples per problem (T1, arXiv 2501.11651, Table 1: AIME with
n = 32)::

    c_p      = (1/n) sum_k correct(p, k)                  per-problem mean, correct in {0, 1}
    pass@1   = (1/|P|) sum_p c_p
    stderr   = std(c_p over p, ddof=1) / sqrt(|P|)

(:func:`megatron_t1.eval.heldout.pass_at_1`). A response is correct iff its reward is the reward
config's ``correct`` value: a penalised response (over-long, repetitive, garbage) counts as wrong,
exactly as the RL reward sees it. Every response becomes one record (question, reference, response,
extracted answer, reward, reason, tokens, finish reason) so that a run can be audited line by line,
and every statistic here is a pure function of those records (:func:`summarise`).
"""

from __future__ import annotations

import math
from array import array
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from megatron_t1.data.template import prompt_messages
from megatron_t1.eval.heldout import pass_at_1
from megatron_t1.eval.loaders import EvalProblem

__all__ = [
    "BenchmarkResult",
    "GroupStats",
    "PromptSamples",
    "Sample",
    "chat_prompt_ids",
    "compact",
    "format_table",
    "generate_and_score",
    "result_rows",
    "score_records",
    "summarise",
]


@dataclass
class GroupStats:
    """pass@1 of a group of problems (a whole benchmark, a subject or a difficulty level)."""

    accuracy: float
    """Mean over problems of the per-problem mean correctness (pass@1)."""
    stderr: float
    """Standard deviation (ddof=1) of the per-problem means over sqrt(problems); NaN for 1 problem."""
    num_problems: int
    num_responses: int
    mean_tokens: float
    """Mean generated tokens per response."""


@dataclass
class BenchmarkResult:
    """One checkpoint on one benchmark: overall, per subject and per difficulty level."""

    checkpoint: str
    benchmark: str
    n_samples: int
    overall: GroupStats
    by_subject: dict[str, GroupStats] = field(default_factory=dict)
    by_level: dict[str, GroupStats] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    """How many responses got each reward reason (correct, wrong, no_answer, overlong, ...)."""

    def to_dict(self) -> dict:
        """JSON-ready (NaN becomes None)."""
        return _finite(asdict(self))


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# Generation and scoring
# --------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One response kept for the scaling sweep: ids as a 4-byte ``array`` (a Python list of ints
    takes 8x the memory; 500 problems x 32 samples x 16k tokens is 256M ids) and no log-probs."""

    token_ids: array
    text: str
    finish_reason: str

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class PromptSamples:
    """The samples of one prompt (the fields of the engine's ``PromptCompletions`` the sweep reads)."""

    prompt_token_ids: list[int]
    completions: list[Sample]


def compact(pc) -> PromptSamples:
    """An engine's :class:`~megatron_t1.rollout.engine.PromptCompletions` without its log-probs."""
    return PromptSamples(
        list(pc.prompt_token_ids),
        [Sample(array("i", c.token_ids), c.text, c.finish_reason) for c in pc.completions],
    )


def chat_prompt_ids(
    tokenizer, problems: Sequence[EvalProblem], *, system: str | None = None
) -> list[list[int]]:
    """Token ids of the prompt (:data:`megatron_t1.data.template.DEFAULT_PROMPT_TEMPLATE`, the RL
    default) rendered by the tokenizer's chat template with the generation prompt, for every problem."""
    out = []
    for p in problems:
        text = tokenizer.apply_chat_template(
            prompt_messages(p.question, system=system), tokenize=False, add_generation_prompt=True
        )
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def score_records(
    problems: Sequence[EvalProblem],
    texts: Sequence[Sequence[str]],
    scorer,
    *,
    truncated: Sequence[Sequence[bool]],
    tokens: Sequence[Sequence[int]],
    checkpoint: str,
    extra: Sequence[Sequence[dict]] | None = None,
) -> list[dict]:
    """Score ``texts[p][k]`` (response k of problem p) and return one record per response.

    ``scorer`` is a :class:`megatron_t1.reward.RewardScorer` (one pool for the whole evaluation).
    ``extra[p][k]`` (optional) is merged into the record (e.g. the budget of a scaling pass).
    """
    flat_text, flat_gold, flat_trunc = [], [], []
    for p, row, trow in zip(problems, texts, truncated, strict=True):
        for text, tr in zip(row, trow, strict=True):
            flat_text.append(text)
            flat_gold.append(p.answer)
            flat_trunc.append(bool(tr))
    batch = scorer.score(flat_text, flat_gold, truncated=flat_trunc)
    correct_value = scorer.cfg.correct
    records, i = [], 0
    for pi, p in enumerate(problems):
        for k in range(len(texts[pi])):
            rec = {
                "checkpoint": checkpoint,
                "benchmark": p.benchmark,
                "problem_id": p.id,
                "sample": k,
                "subject": p.subject,
                "level": p.level,
                "question": p.question,
                "gold": p.answer,
                "response": flat_text[i],
                "extracted": batch.extracted[i],
                "reward": batch.rewards[i],
                "reason": batch.reasons[i],
                "correct": 1.0 if batch.rewards[i] == correct_value else 0.0,
                "tokens": int(tokens[pi][k]),
                "truncated": flat_trunc[i],
            }
            if extra is not None:
                rec.update(extra[pi][k])
            records.append(rec)
            i += 1
    return records


def generate_and_score(
    engine,
    tokenizer,
    problems: Sequence[EvalProblem],
    scorer,
    *,
    n: int,
    params,
    checkpoint: str,
    system: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[BenchmarkResult, list[dict], list]:
    """Sample ``n`` responses per problem with ``engine`` (a :class:`~megatron_t1.rollout.engine.
    RolloutEngine`) under ``params`` (:class:`~megatron_t1.rollout.engine.SamplingParams`), score
    them, summarise.

    Returns ``(result, records, samples)``; ``samples`` (one :class:`PromptSamples` per problem:
    token ids and text, without the log-probs) feed the inference-scaling sweep, which reuses these
    samples instead of generating again.
    """
    prompts = chat_prompt_ids(tokenizer, problems, system=system)
    if progress is not None:
        progress(
            f"{checkpoint} / {problems[0].benchmark}: {len(problems)} problems x {n} samples, "
            f"max {params.max_tokens} tokens"
        )
    completions = engine.generate(prompts, n, params)
    if len(completions) != len(problems):
        raise RuntimeError(f"engine returned {len(completions)} prompts' samples for {len(problems)} prompts")
    completions = [compact(pc) for pc in completions]
    texts = [[c.text for c in pc.completions] for pc in completions]
    trunc = [[c.truncated for c in pc.completions] for pc in completions]
    toks = [[len(c.token_ids) for c in pc.completions] for pc in completions]
    extra = [[{"finish_reason": c.finish_reason} for c in pc.completions] for pc in completions]
    records = score_records(
        problems, texts, scorer, truncated=trunc, tokens=toks, checkpoint=checkpoint, extra=extra
    )
    return summarise(records, checkpoint=checkpoint, benchmark=problems[0].benchmark), records, completions


# --------------------------------------------------------------------------------------------------
# Statistics (pure functions of the records)
# --------------------------------------------------------------------------------------------------


def _group_stats(records: Sequence[dict]) -> GroupStats:
    per_problem: dict[str, list[float]] = defaultdict(list)
    for r in records:
        per_problem[r["problem_id"]].append(float(r["correct"]))
    acc, se = pass_at_1(list(per_problem.values()))
    mean_tokens = sum(r["tokens"] for r in records) / len(records)
    return GroupStats(acc, se, len(per_problem), len(records), mean_tokens)


def _by(records: Sequence[dict], key: str) -> dict[str, GroupStats]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.get(key) is not None:
            groups[str(r[key])].append(r)
    return {g: _group_stats(rs) for g, rs in sorted(groups.items(), key=lambda kv: _natural(kv[0]))}


def _natural(s: str) -> tuple:
    """Sort "2" before "10" and numbers before words."""
    try:
        return (0, float(s), "")
    except ValueError:
        return (1, 0.0, s)


def summarise(records: Sequence[dict], *, checkpoint: str, benchmark: str) -> BenchmarkResult:
    """pass@1 (overall, per subject, per level) from per-response records of one benchmark.

    Every problem must have the same number of samples (it is the ``n`` reported).
    """
    if not records:
        raise ValueError(f"{benchmark}: no records")
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        counts[r["problem_id"]] += 1
    ns = set(counts.values())
    if len(ns) != 1:
        raise ValueError(f"{benchmark}: problems have different sample counts {sorted(ns)}")
    reasons: dict[str, int] = defaultdict(int)
    for r in records:
        reasons[r["reason"]] += 1
    return BenchmarkResult(
        checkpoint=checkpoint,
        benchmark=benchmark,
        n_samples=ns.pop(),
        overall=_group_stats(records),
        by_subject=_by(records, "subject"),
        by_level=_by(records, "level"),
        reasons=dict(sorted(reasons.items())),
    )


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------

RESULT_COLUMNS = (
    "checkpoint",
    "benchmark",
    "group",
    "value",
    "num_problems",
    "n_samples",
    "accuracy",
    "stderr",
    "mean_tokens",
)


def result_rows(result: BenchmarkResult) -> list[dict]:
    """Flat rows for the csv and the console: the overall row, then one per subject and level."""
    rows = []

    def add(group: str, value: str, s: GroupStats) -> None:
        rows.append(
            {
                "checkpoint": result.checkpoint,
                "benchmark": result.benchmark,
                "group": group,
                "value": value,
                "num_problems": s.num_problems,
                "n_samples": result.n_samples,
                "accuracy": s.accuracy,
                "stderr": s.stderr,
                "mean_tokens": s.mean_tokens,
            }
        )

    add("all", "", result.overall)
    for name, s in result.by_subject.items():
        add("subject", name, s)
    for name, s in result.by_level.items():
        add("level", name, s)
    return rows


def _cell(v) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return "" if v is None else str(v)


def format_table(rows: Sequence[dict], columns: Sequence[str], *, max_width: int = 32) -> str:
    """A plain fixed-width text table (console output)."""
    cells = [[_cell(r.get(c))[:max_width] for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[j]) for row in cells]) for j, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += [
        "  ".join(v.rjust(w) if _is_num(v) else v.ljust(w) for v, w in zip(row, widths)) for row in cells
    ]
    return "\n".join(lines)


def _is_num(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
