"""tools/prepare_data.py and megatron_t1.eval.prepare: normalisation of MATH-train, NuminaMath and
T1-SFT layouts, deduplication and n-gram decontamination against the benchmarks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from megatron_t1.data.io import DataError
from megatron_t1.eval.prepare import (
    Decontaminator,
    SourceReport,
    dedupe,
    math_train_records,
    normalise_question,
    numina_records,
    t1_sft_records,
    word_tokens,
)

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures" / "eval"
PREP = FIX / "prepare"


def _tool():
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "tools" / "prepare_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_math_train_folder_layout():
    recs, dropped = math_train_records(PREP / "math_train")
    assert dropped == 1  # the proof problem has no boxed answer
    assert [(r["id"], r["answer"], r["subject"], r["level"]) for r in recs] == [
        ("math/algebra/1.json", "5", "Algebra", "1"),
        ("math/algebra/2.json", "2", "Algebra", "2"),
    ]
    assert recs[0]["question"] == "If $y + 3 = 8$, what is $y$?"


def test_numina_layout_answer_field_boxed_fallback_and_drops():
    recs, dropped = numina_records(PREP / "numina.jsonl")
    assert dropped == 1  # answer "proof"
    assert [r["answer"] for r in recs] == ["5", "16", "24", "7", "55"]
    assert recs[1]["source"] == "numina/olympiads" and recs[4]["id"] == "numina/5"


def test_t1_sft_layouts():
    recs = t1_sft_records(PREP / "t1_sft.jsonl")
    assert len(recs) == 4
    assert recs[2]["messages"][0] == {
        "role": "user",
        "content": "For positive reals $a, b$ with $a + b = 2$, find the maximum of $ab$. Think carefully.",
    }
    assert [m["role"] for m in recs[3]["messages"]] == ["user", "assistant"]
    assert [r["answer"] for r in recs] == ["4", "4", "1", "5"]


def test_t1_sft_bad_record(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="s.jsonl:1: a conversation needs a user turn"):
        t1_sft_records(f)


def test_normalisation_and_tokens():
    assert normalise_question("If  $y + 3 = 8$, what is $y$?") == normalise_question("if y+3=8, WHAT is y?")
    assert word_tokens("Let $N$ be $2^{4}\\cdot 3$.") == ["let", "n", "be", "2", "4", "cdot", "3"]


def test_dedupe_first_wins_across_calls():
    seen: dict[str, str] = {}
    a, ra = dedupe([{"id": "a", "question": "Q one"}, {"id": "b", "question": "q  ONE"}], seen)
    b, rb = dedupe([{"id": "c", "question": "$Q$ one"}, {"id": "d", "question": "Q two"}], seen)
    assert [r["id"] for r in a + b] == ["a", "d"]
    assert [(r["id"], r["duplicate_of"]) for r in ra + rb] == [("b", "a"), ("c", "a")]


def test_decontamination_ngram_and_short_questions():
    bench = [
        {
            "id": "aime/60",
            "source": "aime2024",
            "question": "Let $N$ be the number of positive divisors of $2^{4} \\cdot 3^{2}$. Find $N$.",
        },
        {"id": "m/903", "source": "math500", "question": "Solve for $x$: $2x - 5 = 9$."},
        {"id": "m/tiny", "source": "math500", "question": "Compute $2+3$."},
    ]
    d = Decontaminator(bench, n=13, min_tokens=6)
    rep = SourceReport()
    train = [
        {
            "id": "t1",
            "question": "LET $N$ be the number of positive divisors of $2^{4}\\cdot 3^{2}$. Then add 1.",
        },
        {"id": "t2", "question": "Find the number of positive divisors of 360."},  # 5 shared words only
        {"id": "t3", "question": "Warm-up. Solve for x: 2x - 5 = 9, and report x."},  # short one, whole
        {"id": "t4", "question": "Compute 2+3 and then 4+5."},  # below min_tokens: not matched
    ]
    kept, removed = d.filter(train, rep)
    assert [r["id"] for r in kept] == ["t2", "t4"]
    assert [(r["id"], r["contaminated_by"]) for r in removed] == [("t1", "aime/60"), ("t3", "m/903")]
    assert removed[0]["overlap"].split() == word_tokens(bench[0]["question"])[:13]
    assert removed[1]["overlap"] == "solve for x 2x 5 9"
    assert rep.contaminated == 2 and rep.by_benchmark == {"aime2024": 1, "math500": 1}
    # one token fewer than the window in common is not contamination
    d14 = Decontaminator(bench[:1], n=14)
    assert d14.match("number of positive divisors of $2^{4}\\cdot 3^{2}$. Find $N$ quickly") is None
    assert Decontaminator(bench[:1], n=12).match(
        "number of positive divisors of $2^{4}\\cdot 3^{2}$. Find $N$ x"
    )


def test_prepare_tool_end_to_end(tmp_path, capsys):
    out = tmp_path / "prepared"
    rc = _tool().main(
        [
            "--out",
            str(out),
            "--benchmark-dir",
            str(FIX),
            "--benchmarks",
            "math500,aime2024,omni_math,gpqa",
            "--math-train",
            str(PREP / "math_train"),
            "--numina",
            str(PREP / "numina.jsonl"),
            "--t1-sft",
            str(PREP / "t1_sft.jsonl"),
        ]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["benchmarks"] == {"math500": 4, "aime2024": 3, "omni_math": 3, "gpqa": 3}
    assert report["sources"]["math_train"] == {
        "read": 3,
        "dropped_no_answer": 1,
        "duplicates": 0,
        "contaminated": 0,
        "kept": 2,
        "by_benchmark": {},
    }
    # numina: 6 rows, 1 proof, 1 duplicate of MATH-train's y + 3 = 8, 2 contaminated (AIME, MATH500)
    assert report["sources"]["numina"] == {
        "read": 6,
        "dropped_no_answer": 1,
        "duplicates": 1,
        "contaminated": 2,
        "kept": 2,
        "by_benchmark": {"aime2024": 1, "math500": 1},
    }
    assert report["sources"]["t1_sft"] == {
        "read": 4,
        "dropped_no_answer": 0,
        "duplicates": 1,
        "contaminated": 1,
        "kept": 2,
        "by_benchmark": {"omni_math": 1},
    }
    train = [json.loads(x) for x in (out / "train_prompts.jsonl").read_text().splitlines()]
    assert [r["question"] for r in train] == [
        "If $y + 3 = 8$, what is $y$?",
        "Expand $(a+1)^2$ and name the coefficient of $a$ in the result.",
        "Find the number of positive divisors of 360.",
        "Compute $1+2+\\dots+10$.",
    ]
    sft = [json.loads(x) for x in (out / "t1_sft.jsonl").read_text().splitlines()]
    assert [s["messages"][0]["content"][:13] for s in sft] == ["Compute 2 + 2", "Compute 3 + 2"]
    removed = [json.loads(x) for x in (out / "removed.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in removed) == ["contaminated"] * 3 + ["duplicate"] * 2
    gp = [json.loads(x) for x in (out / "benchmarks" / "gpqa.jsonl").read_text().splitlines()]
    assert [g["answer"] for g in gp] == ["D", "B", "C"] and "(A) " in gp[0]["question"]
    # the normalised benchmark files load back as the same problems
    from megatron_t1.eval.loaders import load_benchmark

    assert [p.answer for p in load_benchmark("gpqa", out / "benchmarks")[1]] == ["D", "B", "C"]
    assert [p.level for p in load_benchmark("omni_math", out / "benchmarks")[1]] == ["2", "6.5", "2"]
    assert "numina" in capsys.readouterr().out


def test_prepare_tool_missing_input(tmp_path, capsys):
    rc = _tool().main(
        [
            "--out",
            str(tmp_path / "o"),
            "--benchmark-dir",
            str(FIX),
            "--benchmarks",
            "math500",
            "--numina",
            str(tmp_path / "nope.jsonl"),
        ]
    )
    assert rc == 2 and "nope.jsonl" in capsys.readouterr().err
