"""Benchmark loaders on small fixture files in each published layout (tests/fixtures/eval/)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megatron_t1.data.io import DataError
from megatron_t1.eval.loaders import (
    find_benchmark_files,
    load_benchmark,
    load_problems,
    parse_record,
)

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "eval"


def _options(question: str) -> dict[str, str]:
    """``(A) text`` lines of a multiple-choice question -> {letter: text}."""
    return dict(re.findall(r"^\(([A-J])\) (.*)$", question, flags=re.MULTILINE))


def test_math500_layout():
    name, ps = load_benchmark("math500", FIX)
    assert name == "math500" and len(ps) == 4
    p = ps[1]
    assert p.id == "test/prealgebra/902.json"
    assert p.question == "Simplify $\\frac{6}{8}$."
    assert p.answer == "\\frac{3}{4}"
    assert (p.subject, p.level) == ("Prealgebra", "2")
    assert [q.subject for q in ps] == ["Prealgebra", "Prealgebra", "Algebra", "Algebra"]
    assert [q.level for q in ps] == ["1", "2", "2", "4"]
    assert all(q.benchmark == "math500" and not q.is_choice for q in ps)


def test_aime_jsonl_and_parquet_layouts():
    _, ps = load_benchmark("aime2024", FIX)
    assert [(p.id, p.answer) for p in ps] == [("60", "15"), ("61", "1"), ("62", "081")]
    assert ps[2].question == "A square has perimeter $36$. Find its area."
    assert ps[0].subject is None and ps[0].level is None
    # Capitalised columns and integer answers (the parquet layout of another AIME 2024 release)
    _, pq = load_benchmark("aime2024", FIX / "parquet")
    assert [(p.id, p.answer) for p in pq] == [("2024-I-1", "16"), ("2024-I-2", "25"), ("2024-II-3", "12")]
    assert pq[1].question == "Compute $5^3 - 100$."
    assert pq[1].solution == "$125 - 100 = 25$."


def test_omni_math_layout_domain_and_difficulty():
    _, ps = load_benchmark("omni_math", FIX)
    assert [p.subject for p in ps] == ["Number Theory", "Algebra", "Discrete Mathematics"]
    assert [p.level for p in ps] == ["2", "6.5", "2"]
    assert [p.answer for p in ps] == ["8", "1", "6"]
    assert ps[0].id == "omni_math/1"  # no id field: benchmark/row


def test_math500_parquet_equals_jsonl():
    _, a = load_benchmark("math500", FIX)
    _, b = load_benchmark("math500", FIX / "parquet")
    assert a == b


@pytest.mark.parametrize("where", [FIX, FIX / "parquet"])
def test_gpqa_options_shuffled_stably_and_letter_points_to_correct_answer(where):
    import csv

    rows = list(csv.DictReader(open(FIX / "gpqa_diamond.csv", newline="", encoding="utf-8")))
    _, ps = load_benchmark("gpqa", where)
    assert [p.id for p in ps] == ["recA1", "recB2", "recC3"]
    letters = []
    for p, row in zip(ps, rows):
        opts = _options(p.question)
        assert sorted(opts) == ["A", "B", "C", "D"]
        assert opts[p.answer] == row["Correct Answer"]
        assert sorted(opts.values()) == sorted(
            [row["Correct Answer"]] + [row[f"Incorrect Answer {i}"] for i in (1, 2, 3)]
        )
        assert p.question.startswith(row["Question"].strip())
        assert p.is_choice
        letters.append(p.answer)
    assert len(set(letters)) > 1  # not always the same position
    assert [p.subject for p in ps] == ["Physics", "Chemistry", "Biology"]
    assert ps[1].level == "Hard undergraduate level"
    _, again = load_benchmark("gpqa", where)
    assert again == ps  # the order depends only on the record id


def test_gpqa_letter_is_what_the_reward_extracts():
    from megatron_t1.reward import extract_answer

    _, ps = load_benchmark("gpqa", FIX)
    for p in ps:
        assert (
            extract_answer(f"<think>...</think>\nThe answer is \\boxed{{{p.answer}}}.", choice=True)
            == p.answer
        )
        assert extract_answer(f"</think>The answer is ({p.answer}).", choice=True) == p.answer


def test_generic_multiple_choice_and_question_answer_layouts():
    _, ps = load_benchmark("mc", FIX)
    assert [(p.id, p.answer) for p in ps] == [("mc1", "C"), ("mc2", "B")]
    assert _options(ps[0].question) == {"A": "4", "B": "6", "C": "7", "D": "9"}
    assert _options(ps[1].question)["B"] == "e"
    _, hs = load_benchmark("heldout", FIX)
    assert [(p.question, p.answer) for p in hs] == [("Compute 4 + 5.", "9"), ("Compute 12 - 7.", "5")]


def test_find_by_alias_folder_and_explicit_path(tmp_path):
    (tmp_path / "MATH-500").mkdir()
    (tmp_path / "MATH-500" / "test.jsonl").write_text((FIX / "math500.jsonl").read_text())
    assert find_benchmark_files("math500", tmp_path) == [tmp_path / "MATH-500" / "test.jsonl"]
    name, ps = load_benchmark(f"mine={FIX / 'omni_math.jsonl'}")
    assert name == "mine" and len(ps) == 3 and ps[0].benchmark == "mine"
    with pytest.raises(FileNotFoundError, match="aime2024.*looked for.*aime_2024"):
        find_benchmark_files("aime2024", tmp_path)


def test_limit_keeps_the_first_problems():
    _, ps = load_benchmark("math500", FIX, limit=2)
    assert [p.id for p in ps] == ["test/prealgebra/901.json", "test/prealgebra/902.json"]


def test_answer_from_boxed_solution_when_no_answer_field():
    p = parse_record(
        {"problem": "q", "solution": "so \\boxed{\\frac{1}{2}} and \\boxed{3}"},
        benchmark="b",
        where="f:1",
        row=1,
    )
    assert p.answer == "3"


@pytest.mark.parametrize(
    "rec, match",
    [
        ({"solution": "no question"}, "f.jsonl:2: no question"),
        ({"problem": "q", "solution": "no box"}, "f.jsonl:2: no reference answer"),
        ({"Question": "q", "Correct Answer": "a", "Incorrect Answer 1": "b"}, "f.jsonl:2: GPQA row"),
        ({"question": "q", "choices": ["a", "b"], "answer": "E"}, "f.jsonl:2: answer"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, rec, match):
    f = tmp_path / "f.jsonl"
    f.write_text(json.dumps({"problem": "ok", "answer": "1"}) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(DataError, match=re.escape(match).replace(r"\.\*", ".*")):
        load_problems([f], "b")


def test_duplicate_ids_are_an_error(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"id": 7, "problem": f"q{i}", "answer": "1"}) for i in range(2)) + "\n")
    with pytest.raises(DataError, match="duplicate id '7'"):
        load_problems([f], "b")


def test_champ_problems_if_installed():
    pytest.importorskip("champ_dataset")
    from megatron_t1.eval.loaders import champ_problems

    ps = champ_problems()
    assert len(ps) == 270
    assert len({p.id for p in ps}) == 270
    assert all(p.answer and p.question and p.solution and "@@" not in p.answer for p in ps)
