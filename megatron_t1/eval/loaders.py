"""Benchmark loaders: MATH500, AIME 2024, Omni-MATH(-500), GPQA and our own layout, from local files.

Nothing is downloaded. A benchmark is read from ``--data-dir`` (``<dir>/<name>.jsonl|parquet|json|csv``
or every data file under ``<dir>/<name>/``, under the name or one of its aliases) or from an
explicit ``name=PATH``. The record layout is recognised per row from its fields:

==================  ======================================================================
layout              fields (case as published)
==================  ======================================================================
MATH500 / MATH      ``problem``, ``answer`` (else the last ``\\boxed{}`` of ``solution``),
                    ``subject`` or ``type``, ``level`` (``3`` or ``"Level 3"``), ``unique_id``
AIME 2024           ``problem``/``Problem``, ``answer``/``Answer`` (int or str), ``id``/``ID``
Omni-MATH           ``problem``, ``answer``, ``domain`` (list of ``"Mathematics -> Algebra ->
                    ..."``), ``difficulty`` (float 1-10), ``source``
GPQA                ``Question``, ``Correct Answer``, ``Incorrect Answer 1..3``,
                    ``High-level domain``, ``Subdomain``, ``Record ID`` (csv/parquet/jsonl)
multiple choice     ``question``, ``choices``/``options`` (list), ``answer`` (letter or index)
ours (normalised)   ``question``, ``answer``, optional ``id``, ``subject``, ``level``, ``source``
==================  ======================================================================

GPQA's four options are put in a fixed pseudo-random order per question (seeded by a hash of its
id, so every run and every checkpoint sees the same order) and shown as ``(A) ... (D)``; the
reference becomes the letter, which :func:`megatron_t1.reward.extract_answer` reads back from a
boxed letter or "the answer is (C)".

:func:`champ_problems` reads the 270 problems of the ``champ-dataset`` package (answers and
reference solutions), used as an integration check of answer extraction and verification.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_t1.data.io import DataError, read_records
from megatron_t1.reward.extract import last_boxed

__all__ = [
    "BENCHMARK_ALIASES",
    "DATA_SUFFIXES",
    "EvalProblem",
    "champ_final_answer",
    "champ_problems",
    "find_benchmark_files",
    "format_choices",
    "load_benchmark",
    "load_problems",
    "parse_record",
]

DATA_SUFFIXES = (".jsonl", ".parquet", ".json", ".csv")
LETTERS = "ABCDEFGHIJ"

BENCHMARK_ALIASES: dict[str, tuple[str, ...]] = {
    "math500": ("math500", "math-500", "MATH-500", "MATH500", "math_500"),
    "aime2024": ("aime2024", "aime_2024", "AIME_2024", "AIME2024", "aime-2024", "aimo-validation-aime"),
    "omni_math500": ("omni_math500", "omni-math-500", "Omni-MATH-500", "omnimath500", "omni_math_500"),
    "omni_math": ("omni_math", "omni-math", "Omni-MATH", "omnimath"),
    "gpqa": ("gpqa", "gpqa_diamond", "GPQA", "gpqa-diamond", "GPQA-Diamond"),
}
"""File or folder names tried under ``--data-dir`` for each benchmark name (the first is canonical)."""

_QUESTION_KEYS = ("question", "problem", "Problem", "Question", "prompt")
_ANSWER_KEYS = ("answer", "Answer", "final_answer", "expected_answer")
_SOLUTION_KEYS = ("solution", "Solution")
_ID_KEYS = ("unique_id", "id", "ID", "Record ID", "idx", "problem_id")


@dataclass(frozen=True)
class EvalProblem:
    """One evaluation problem.

    Attributes:
        id: stable identifier (the record's own id, else ``<benchmark>/<row>``).
        benchmark: benchmark name (e.g. ``"math500"``).
        question: what goes into the prompt template (multiple choice: with the lettered options).
        answer: the reference: LaTeX / plain text, or a letter for multiple choice.
        subject: subject or domain for the per-subject table (None if the layout has none).
        level: difficulty for the per-difficulty table, as text (``"3"``, ``"6.5"``), or None.
        solution: the reference solution when the layout carries one (not used for scoring).
    """

    id: str
    benchmark: str
    question: str
    answer: str
    subject: str | None = None
    level: str | None = None
    solution: str | None = None

    @property
    def is_choice(self) -> bool:
        """The reference is a choice letter (GPQA-style)."""
        return len(self.answer) == 1 and self.answer in LETTERS


# --------------------------------------------------------------------------------------------------
# One record
# --------------------------------------------------------------------------------------------------


def _text(value) -> str | None:
    """A non-empty string from a str / int / float field, else None (bools are not answers)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _first(rec: dict, keys: tuple[str, ...]) -> str | None:
    for k in keys:
        v = _text(rec.get(k))
        if v is not None:
            return v
    return None


def _level(rec: dict) -> str | None:
    """``level`` 3 / "Level 3" -> "3"; Omni-MATH ``difficulty`` 6.5 -> "6.5"."""
    for key in ("level", "Level", "difficulty", "Difficulty"):
        v = rec.get(key)
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            return str(int(v)) if float(v).is_integer() else f"{float(v):g}"
        if isinstance(v, str) and v.strip():
            m = re.fullmatch(r"\s*(?:level\s*)?(\d+(?:\.\d+)?)\s*", v, flags=re.IGNORECASE)
            return m.group(1) if m else v.strip()
    return None


def _subject(rec: dict) -> str | None:
    """``subject`` / ``type`` (MATH), ``domain`` (Omni-MATH: its second level), ``category``."""
    for key in ("subject", "type", "category", "High-level domain"):
        v = _text(rec.get(key))
        if v is not None:
            return v
    dom = rec.get("domain")
    if isinstance(dom, str):
        dom = [dom]
    if isinstance(dom, (list, tuple)) and dom and isinstance(dom[0], str):
        # "Mathematics -> Algebra -> Linear Algebra": the first level is always "Mathematics"
        parts = [p.strip() for p in dom[0].split("->") if p.strip()]
        if len(parts) >= 2 and parts[0].lower() == "mathematics":
            return parts[1]
        return parts[0] if parts else None
    return None


def format_choices(question: str, options: list[str]) -> str:
    """The question followed by one ``(A) option`` line per option."""
    lines = [question.strip(), ""]
    lines += [f"({LETTERS[i]}) {opt.strip()}" for i, opt in enumerate(options)]
    return "\n".join(lines)


def _stable_shuffle(key: str, n: int) -> list[int]:
    """A permutation of range(n) that depends only on ``key`` (sha256-seeded)."""
    seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _gpqa(rec: dict, where: str, benchmark: str, row: int) -> EvalProblem:
    question = _text(rec.get("Question"))
    correct = _text(rec.get("Correct Answer"))
    wrong = [_text(rec.get(f"Incorrect Answer {i}")) for i in (1, 2, 3)]
    if question is None or correct is None or any(w is None for w in wrong):
        raise DataError(f"{where}: GPQA row needs Question, Correct Answer and Incorrect Answer 1-3")
    pid = _first(rec, _ID_KEYS) or f"{benchmark}/{row}"
    options = [correct, *wrong]
    order = _stable_shuffle(pid, len(options))
    shown = [options[i] for i in order]
    letter = LETTERS[order.index(0)]
    # "Hard undergraduate level (could be a question on ...)" -> "Hard undergraduate level"
    level = _text(rec.get("Writer's Difficulty Estimate"))
    level = level.split("(")[0].strip() or level if level else None
    return EvalProblem(
        pid,
        benchmark,
        format_choices(question, shown),
        letter,
        _text(rec.get("High-level domain")),
        level,
        _text(rec.get("Explanation")),
    )


def _choice(rec: dict, where: str, benchmark: str, row: int) -> EvalProblem:
    question = _first(rec, _QUESTION_KEYS)
    options = rec.get("choices", rec.get("options"))
    if isinstance(options, dict):  # {"A": "...", "B": "..."}
        options = [options[k] for k in sorted(options)]
    if question is None or not isinstance(options, (list, tuple)) or not 2 <= len(options) <= len(LETTERS):
        raise DataError(f"{where}: a multiple-choice row needs a question and 2-{len(LETTERS)} choices")
    options = [str(o) for o in options]
    ans = rec.get("answer", rec.get("Answer", rec.get("answer_index", rec.get("label"))))
    if isinstance(ans, int) and not isinstance(ans, bool) and 0 <= ans < len(options):
        letter = LETTERS[ans]
    elif isinstance(ans, str) and re.fullmatch(r"\s*\(?([A-J])\)?\s*", ans):
        letter = re.fullmatch(r"\s*\(?([A-J])\)?\s*", ans).group(1)
    elif isinstance(ans, str) and ans.strip() in options:
        letter = LETTERS[options.index(ans.strip())]
    else:
        raise DataError(f"{where}: answer {ans!r} is not a letter, an index or one of the choices")
    if LETTERS.index(letter) >= len(options):
        raise DataError(f"{where}: answer {letter} but only {len(options)} choices")
    pid = _first(rec, _ID_KEYS) or f"{benchmark}/{row}"
    return EvalProblem(pid, benchmark, format_choices(question, options), letter, _subject(rec), _level(rec))


def parse_record(rec: dict, *, benchmark: str, where: str, row: int) -> EvalProblem:
    """One record of any supported layout -> :class:`EvalProblem`.

    Args:
        rec: the row (a dict).
        benchmark: the benchmark name it belongs to.
        where: ``path:line`` for error messages.
        row: 1-based row number (the id when the row has none).

    Raises:
        DataError: no question, or no reference answer (neither an answer field nor a boxed
            answer in the solution).
    """
    if "Correct Answer" in rec:
        return _gpqa(rec, where, benchmark, row)
    if "choices" in rec or "options" in rec:
        return _choice(rec, where, benchmark, row)
    question = _first(rec, _QUESTION_KEYS)
    if question is None:
        raise DataError(f"{where}: no question (one of {', '.join(_QUESTION_KEYS)}); has {sorted(rec)}")
    solution = _first(rec, _SOLUTION_KEYS)
    answer = _first(rec, _ANSWER_KEYS)
    if answer is None and solution is not None:
        answer = last_boxed(solution)
    if answer is None:
        raise DataError(f"{where}: no reference answer ({', '.join(_ANSWER_KEYS)}, or a boxed solution)")
    pid = _first(rec, _ID_KEYS) or f"{benchmark}/{row}"
    return EvalProblem(pid, benchmark, question, answer, _subject(rec), _level(rec), solution)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _rows_csv(path: Path) -> Iterator[tuple[int, dict]]:
    """CSV rows as dicts (GPQA ships as CSV); row numbers count the header as line 1."""
    with open(path, encoding="utf-8", newline="") as f:
        for i, rec in enumerate(csv.DictReader(f), start=2):
            yield i, {k: v for k, v in rec.items() if k is not None}


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    if path.suffix.lower() == ".csv":
        yield from _rows_csv(path)
    else:
        yield from read_records(path)


def load_problems(
    paths: list[str | os.PathLike], benchmark: str, *, limit: int | None = None
) -> list[EvalProblem]:
    """Problems of one benchmark from its data files, in file then row order.

    Ids must be unique within the benchmark (per-problem statistics group by id): a duplicate is a
    :class:`DataError`. ``limit`` keeps the first ``limit`` problems.
    """
    out: list[EvalProblem] = []
    seen: dict[str, str] = {}
    for path in map(Path, paths):
        for line_no, rec in _rows(path):
            where = f"{path}:{line_no}"
            p = parse_record(rec, benchmark=benchmark, where=where, row=len(out) + 1)
            if p.id in seen:
                raise DataError(f"{where}: duplicate id {p.id!r} (first at {seen[p.id]})")
            seen[p.id] = where
            out.append(p)
            if limit is not None and len(out) >= limit:
                return out
    if not out:
        raise DataError(f"{', '.join(map(str, paths))}: no problems")
    return out


def find_benchmark_files(name: str, data_dir: str | os.PathLike) -> list[Path]:
    """The data files of benchmark ``name`` under ``data_dir`` (see the module docstring).

    Raises FileNotFoundError listing every place that was looked at.
    """
    d = Path(data_dir)
    tried = []
    for alias in BENCHMARK_ALIASES.get(name, (name,)):
        for suffix in DATA_SUFFIXES:
            f = d / f"{alias}{suffix}"
            tried.append(str(f))
            if f.is_file():
                return [f]
        folder = d / alias
        tried.append(f"{folder}/")
        if folder.is_dir():
            files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
            if files:
                return files
    raise FileNotFoundError(f"benchmark {name!r}: no data file; looked for {', '.join(tried)}")


def load_benchmark(
    spec: str, data_dir: str | os.PathLike | None = None, *, limit: int | None = None
) -> tuple[str, list[EvalProblem]]:
    """``"math500"`` (found under ``data_dir``) or ``"name=PATH"`` -> (name, problems)."""
    name, sep, path = spec.partition("=")
    name = name.strip()
    if sep:
        p = Path(path)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in DATA_SUFFIXES)
        else:
            files = [p]
        if not files or not files[0].exists():
            raise FileNotFoundError(f"benchmark {name!r}: no data file at {path}")
    else:
        if data_dir is None:
            raise FileNotFoundError(f"benchmark {name!r}: pass --data-dir or {name}=PATH")
        files = find_benchmark_files(name, data_dir)
    return name, load_problems(files, name, limit=limit)


# --------------------------------------------------------------------------------------------------
# CHAMP (integration check of extraction + verification on real competition solutions)
# --------------------------------------------------------------------------------------------------


def champ_problems() -> list[EvalProblem]:
    """The 270 problems of the ``champ-dataset`` package (MIT), with reference solution and answer.

    CHAMP marks mathematical spans with ``@@...@@``; ``answer`` and ``question`` are the unmarked
    texts, ``solution`` keeps the marks (one step per line) so that the final mathematical
    statement of a solution can be located. ``subject`` is the CHAMP category. Raises ImportError
    when the package is not installed.
    """
    import champ_dataset

    path = Path(champ_dataset.__file__).parent / "dataset_files" / "v0.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for pid, p in data["problems"].items():
        steps = [s["_raw_text"] for s in p["solution"]["steps"]]
        out.append(
            EvalProblem(
                pid,
                "champ",
                p["_raw_text"].replace("@@", ""),
                p["_raw_answer"].replace("@@", ""),
                p.get("category"),
                None,
                "\n".join(steps),
            )
        )
    return out


_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")


def champ_final_answer(solution: str) -> str | None:
    """The final answer a CHAMP reference solution states: the last mathematical object (a
    ``@@...@@`` span or a bare number) of its last step that has one; None if there is none.

    CHAMP solutions are prose without a box or an answer phrase, so this is the one place that
    needs a dataset-specific rule; the answer it returns is then boxed and goes through the same
    extraction and verification as a model response.
    """
    for line in reversed(solution.split("\n")):
        found: list[tuple[int, str]] = []
        pos = 0
        for m in re.finditer(r"@@(.*?)@@", line):
            found += [(n.start(), n.group()) for n in _NUMBER.finditer(line, pos, m.start())]
            found.append((m.start(), m.group(1).strip()))
            pos = m.end()
        found += [(n.start(), n.group()) for n in _NUMBER.finditer(line, pos)]
        if found:
            return found[-1][1]
    return None
