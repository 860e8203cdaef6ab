"""RL prompt sets: question + reference answer, from jsonl or parquet, in a fixed-seed order.

Field names of the common layouts are recognised without configuration: ``question`` / ``problem``
/ ``prompt`` for the question and ``answer`` / ``final_answer`` / ``solution`` (its last
``\\boxed{}``) for the reference (MATH, MATH500, AIME 2024, Omni-MATH, NuminaMath, our synthetic
task). The order of step ``s`` is a pure function of (seed, s), so a resumed run sees the same
prompts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from megatron_t1.data.io import DataError, read_records
from megatron_t1.data.order import step_slice

QUESTION_FIELDS = ("question", "problem", "prompt")
ANSWER_FIELDS = ("answer", "final_answer", "solution")


@dataclass(frozen=True)
class PromptItem:
    """One RL prompt: the question text and its reference answer."""

    question: str
    answer: str


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def load_prompts(path: str | os.PathLike) -> list[PromptItem]:
    """Read a prompt set; a row without a question or an answer is an error naming file and line."""
    items = []
    for line_no, rec in read_records(path):
        q = next((rec[f] for f in QUESTION_FIELDS if isinstance(rec.get(f), str) and rec[f].strip()), None)
        if q is None:
            raise DataError(f"{path}:{line_no}: no question field (one of {', '.join(QUESTION_FIELDS)})")
        a = None
        for f in ANSWER_FIELDS:
            v = rec.get(f)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                v = str(v)
            if isinstance(v, str) and v.strip():
                a = _last_boxed(v) if f == "solution" else v
                if a:
                    break
        if not a:
            raise DataError(f"{path}:{line_no}: no reference answer (one of {', '.join(ANSWER_FIELDS)})")
        items.append(PromptItem(q, a.strip()))
    if not items:
        raise DataError(f"{path}: no prompts")
    return items


def step_prompts(items: list[PromptItem], step: int, per_step: int, seed: int) -> list[PromptItem]:
    """Prompts of RL step ``step`` (0-based): the epochs' shuffled orders laid end to end."""
    return step_slice(items, step, per_step, seed)
