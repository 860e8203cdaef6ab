"""Training data preparation: normalise, deduplicate, decontaminate against the benchmarks.

Sources (local files only) and what they become:

* **MATH train** (Hendrycks et al.): a folder of one-problem ``.json`` files
  (``train/<subject>/<n>.json``) or a jsonl/parquet of them; fields ``problem``, ``solution``,
  ``level`` ("Level 3"), ``type``. The reference is the last ``\\boxed{}`` of the solution.
* **NuminaMath** (CoT / 1.5): jsonl/parquet with ``problem``, ``solution``, ``source``, and in 1.5 an
  ``answer`` field. Rows without a usable answer (none boxed, or "proof" / "notfound") are dropped
  and counted: RL needs a checkable reference.
* **T1 SFT set**: chat records (``messages``; or ``conversations`` with ``from``/``value``; or
  ``prompt``/``response`` pairs) -> ``{"messages": [user, assistant]}`` (our SFT layout).
* **Benchmarks**: anything :mod:`megatron_t1.eval.loaders` reads -> ``{"id", "question",
  "answer", "subject", "level", "source"}``.

Problem records (``{"id", "question", "answer", "source", "subject", "level"}``) are what the RL
prompt loader and the eval loaders read.

**Deduplication**: exact match of the normalised question (NFKC, lower case, whitespace and ``$``
removed); the first occurrence wins, in source order.

**Decontamination** (n-gram overlap, as in GPT-3 / Qwen2.5-Math): texts become word tokens
(runs of letters or digits, so LaTeX markup does not count); a training question is contaminated
if it shares any ``n``-token window with a benchmark question, or, for a benchmark question
shorter than ``n`` tokens, contains its whole token sequence (of at least ``min_tokens``). What is
removed is reported with the benchmark problem and the shared text.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from megatron_t1.data.io import DataError, read_records
from megatron_t1.eval.loaders import DATA_SUFFIXES, EvalProblem
from megatron_t1.reward.extract import last_boxed

__all__ = [
    "Decontaminator",
    "SourceReport",
    "dedupe",
    "math_train_records",
    "normalise_question",
    "numina_records",
    "problem_record",
    "t1_sft_records",
    "word_tokens",
]

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_NO_ANSWER = {"proof", "notfound", "none", "", "n/a"}


# --------------------------------------------------------------------------------------------------
# Normalisers
# --------------------------------------------------------------------------------------------------


def problem_record(p: EvalProblem, source: str) -> dict:
    """Our problem layout for a benchmark or training problem."""
    return {
        "id": p.id,
        "question": p.question,
        "answer": p.answer,
        "source": source,
        "subject": p.subject,
        "level": p.level,
    }


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in DATA_SUFFIXES)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return [path]


def _rows_any(path: Path) -> Iterator[tuple[str, dict]]:
    """Rows of a file, or of every data file in a folder; a ``.json`` holding one object is one row
    (the MATH layout), a list is many."""
    for f in _data_files(path):
        if f.suffix.lower() == ".json":
            data = json.loads(f.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                yield str(f), data
                continue
        for line_no, rec in read_records(f):
            yield f"{f}:{line_no}", rec


def math_train_records(path: str | os.PathLike) -> tuple[list[dict], int]:
    """MATH train -> (problem records, rows dropped for lack of a boxed answer)."""
    out, dropped = [], 0
    root = Path(path)
    for where, rec in _rows_any(root):
        q, sol = rec.get("problem"), rec.get("solution")
        if not isinstance(q, str) or not isinstance(sol, str):
            raise DataError(f"{where}: a MATH row needs 'problem' and 'solution'")
        ans = rec.get("answer") if isinstance(rec.get("answer"), str) else last_boxed(sol)
        if not ans:
            dropped += 1
            continue
        level = rec.get("level")
        level = re.sub(r"(?i)^\s*level\s*", "", level) if isinstance(level, str) else level
        rel = os.path.relpath(where, root) if root.is_dir() else where
        out.append(
            {
                "id": f"math/{rel}",
                "question": q.strip(),
                "answer": ans.strip(),
                "source": "math_train",
                "subject": rec.get("type") or rec.get("subject"),
                "level": None if level is None else str(level),
            }
        )
    return out, dropped


def numina_records(path: str | os.PathLike) -> tuple[list[dict], int]:
    """NuminaMath -> (problem records, rows dropped: no usable answer)."""
    out, dropped = [], 0
    for i, (where, rec) in enumerate(_rows_any(Path(path))):
        q = rec.get("problem")
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{where}: a NuminaMath row needs 'problem'")
        ans = rec.get("answer")
        if not isinstance(ans, str) or ans.strip().lower() in _NO_ANSWER:
            sol = rec.get("solution")
            ans = last_boxed(sol) if isinstance(sol, str) else None
        if not ans or ans.strip().lower() in _NO_ANSWER:
            dropped += 1
            continue
        src = rec.get("source") or "numina"
        out.append(
            {
                "id": f"numina/{i}",
                "question": q.strip(),
                "answer": ans.strip(),
                "source": f"numina/{src}",
                "subject": rec.get("problem_type"),
                "level": None,
            }
        )
    return out, dropped


def _messages(rec: dict, where: str) -> list[dict]:
    if isinstance(rec.get("messages"), list):
        msgs = [{"role": m.get("role"), "content": m.get("content")} for m in rec["messages"]]
    elif isinstance(rec.get("conversations"), list):
        roles = {
            "human": "user",
            "user": "user",
            "gpt": "assistant",
            "assistant": "assistant",
            "system": "system",
        }
        msgs = [
            {"role": roles.get(str(m.get("from")).lower(), m.get("from")), "content": m.get("value")}
            for m in rec["conversations"]
        ]
    else:
        prompt = next(
            (rec[k] for k in ("prompt", "question", "problem", "instruction") if isinstance(rec.get(k), str)),
            None,
        )
        resp = next(
            (
                rec[k]
                for k in ("response", "output", "completion", "answer_text")
                if isinstance(rec.get(k), str)
            ),
            None,
        )
        if prompt is None or resp is None:
            raise DataError(
                f"{where}: expected 'messages', 'conversations' or prompt/response fields; has {sorted(rec)}"
            )
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": resp}]
    for m in msgs:
        if m["role"] not in ("system", "user", "assistant") or not isinstance(m["content"], str):
            raise DataError(f"{where}: bad message {str(m)[:80]}")
    if not any(m["role"] == "user" for m in msgs) or msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: a conversation needs a user turn and must end with the assistant")
    return msgs


def t1_sft_records(path: str | os.PathLike) -> list[dict]:
    """The released T1 SFT set (or any chat SFT set) -> ``{"id", "messages", "question", "answer"}``.

    ``question`` is the first user turn (what decontamination compares); ``answer`` is the last
    boxed answer of the final assistant turn, or None.
    """
    out = []
    for i, (where, rec) in enumerate(_rows_any(Path(path))):
        msgs = _messages(rec, where)
        question = next(m["content"] for m in msgs if m["role"] == "user")
        out.append(
            {
                "id": f"t1_sft/{i}",
                "messages": msgs,
                "question": question,
                "answer": last_boxed(msgs[-1]["content"]),
            }
        )
    return out


# --------------------------------------------------------------------------------------------------
# Deduplication and decontamination
# --------------------------------------------------------------------------------------------------


def normalise_question(text: str) -> str:
    """The dedup key: NFKC, lower case, ``$`` dropped, whitespace removed."""
    t = unicodedata.normalize("NFKC", text).lower().replace("$", "")
    return re.sub(r"\s+", "", t)


def word_tokens(text: str) -> list[str]:
    """Runs of letters or digits, lower-cased (LaTeX commands count by their name, braces not)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def dedupe(
    records: Iterable[dict],
    seen: dict[str, str] | None = None,
    *,
    key: Callable[[dict], str] = lambda r: r["question"],
) -> tuple[list[dict], list[dict]]:
    """``(kept, removed)``: drop records whose normalised ``key`` (default: the question) was seen
    before (in ``seen``, which maps key -> first id and is updated, or earlier in ``records``).
    Removed records carry ``duplicate_of``."""
    seen = {} if seen is None else seen
    kept, removed = [], []
    for r in records:
        key_text = normalise_question(key(r))
        if key_text in seen:
            removed.append({**r, "duplicate_of": seen[key_text]})
        else:
            seen[key_text] = r["id"]
            kept.append(r)
    return kept, removed


@dataclass
class SourceReport:
    """What happened to one source."""

    read: int = 0
    dropped_no_answer: int = 0
    duplicates: int = 0
    contaminated: int = 0
    kept: int = 0
    by_benchmark: dict[str, int] = field(default_factory=dict)


class Decontaminator:
    """n-gram index of the benchmark questions (see the module docstring).

    Args:
        benchmark: benchmark problem records (``id``, ``question``; ``source`` names the benchmark).
        n: window length in word tokens (13 as in GPT-3's contamination analysis).
        min_tokens: benchmark questions shorter than ``n`` are matched whole if they have at least
            this many tokens (shorter ones, e.g. "Compute 2+3", are matched by dedup only).
    """

    def __init__(self, benchmark: Iterable[dict], *, n: int = 13, min_tokens: int = 6) -> None:
        if n < 1 or min_tokens < 1:
            raise ValueError(f"n={n} and min_tokens={min_tokens} must be >= 1")
        self.n = n
        self.grams: dict[tuple[str, ...], str] = {}
        # short questions, anchored at their first token: token -> [(tokens, id)]
        self.short: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        self.sources: dict[str, str] = {}
        for r in benchmark:
            toks = tuple(word_tokens(r["question"]))
            self.sources[r["id"]] = r.get("source") or ""
            if len(toks) >= n:
                for i in range(len(toks) - n + 1):
                    self.grams.setdefault(toks[i : i + n], r["id"])
            elif len(toks) >= min_tokens:
                self.short.setdefault(toks[0], []).append((toks, r["id"]))

    def match(self, text: str) -> tuple[str, str] | None:
        """``(benchmark id, shared text)`` of the first overlap of ``text`` with a benchmark, or None."""
        toks = word_tokens(text)
        n = self.n
        for i in range(len(toks) - n + 1):
            hit = self.grams.get(tuple(toks[i : i + n]))
            if hit is not None:
                return hit, " ".join(toks[i : i + n])
        if self.short:
            for i, t in enumerate(toks):
                for seq, pid in self.short.get(t, ()):
                    if tuple(toks[i : i + len(seq)]) == seq:
                        return pid, " ".join(seq)
        return None

    def filter(self, records: Iterable[dict], report: SourceReport) -> tuple[list[dict], list[dict]]:
        """``(kept, removed)``; removed records carry ``contaminated_by`` and ``overlap``."""
        kept, removed = [], []
        for r in records:
            m = self.match(r["question"])
            if m is None:
                kept.append(r)
                continue
            pid, shared = m
            removed.append({**r, "contaminated_by": pid, "overlap": shared})
            bench = self.sources.get(pid, "")
            report.by_benchmark[bench] = report.by_benchmark.get(bench, 0) + 1
        report.contaminated += len(removed)
        return kept, removed
