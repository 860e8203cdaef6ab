"""pass@1 and its standard error against hand-computed values; per-subject / per-level tables;
scoring records with T1's reward (in-process scorer)."""

from __future__ import annotations

import math

import pytest

from megatron_t1.eval.benchmark import (
    RESULT_COLUMNS,
    format_table,
    result_rows,
    score_records,
    summarise,
)
from megatron_t1.eval.heldout import pass_at_1
from megatron_t1.eval.loaders import EvalProblem


def _records(correct: dict[str, list[int]], subject: dict[str, str], level: dict[str, str]) -> list[dict]:
    return [
        {
            "problem_id": pid,
            "correct": float(c),
            "tokens": 10 * (k + 1),
            "subject": subject[pid],
            "level": level[pid],
            "reason": "correct" if c else "wrong",
        }
        for pid, cs in correct.items()
        for k, c in enumerate(cs)
    ]


def test_pass_at_1_hand_computed():
    # per-problem means 2/4, 4/4, 0/4, 1/4 -> mean (0.5 + 1 + 0 + 0.25) / 4 = 0.4375
    # deviations 0.0625, 0.5625, -0.4375, -0.1875; squares sum 0.00390625 + 0.31640625 + 0.19140625
    # + 0.03515625 = 0.546875; sample variance / 3 = 0.18229166...; stderr = sqrt(0.1822916 / 4)
    acc, se = pass_at_1([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]])
    assert acc == pytest.approx(0.4375, abs=1e-15)
    assert se == pytest.approx(math.sqrt(0.546875 / 3 / 4), rel=1e-14)
    assert se == pytest.approx(0.21347814, abs=1e-8)
    # one problem: no spread estimate
    acc1, se1 = pass_at_1([[1, 0]])
    assert acc1 == 0.5 and math.isnan(se1)


def test_summarise_overall_subject_level_hand_computed():
    correct = {"p1": [1, 1, 0, 0], "p2": [1, 1, 1, 1], "p3": [0, 0, 0, 0], "p4": [0, 1, 0, 0]}
    subject = {"p1": "Algebra", "p2": "Algebra", "p3": "Geometry", "p4": "Geometry"}
    level = {"p1": "1", "p2": "10", "p3": "2", "p4": "2"}
    res = summarise(_records(correct, subject, level), checkpoint="ck", benchmark="b")
    assert res.n_samples == 4
    assert res.overall.accuracy == pytest.approx(0.4375)
    assert res.overall.stderr == pytest.approx(0.21347814, abs=1e-8)
    assert res.overall.num_problems == 4 and res.overall.num_responses == 16
    assert res.overall.mean_tokens == pytest.approx(25.0)  # tokens 10, 20, 30, 40 per problem
    # Algebra: means 0.5, 1 -> 0.75, stderr = std([0.5, 1], ddof=1) / sqrt(2) = 0.35355.../1.41421 = 0.25
    assert res.by_subject["Algebra"].accuracy == pytest.approx(0.75)
    assert res.by_subject["Algebra"].stderr == pytest.approx(0.25)
    # Geometry: means 0, 0.25 -> 0.125, stderr 0.125
    assert res.by_subject["Geometry"].accuracy == pytest.approx(0.125)
    assert res.by_subject["Geometry"].stderr == pytest.approx(0.125)
    assert list(res.by_level) == ["1", "2", "10"]  # natural order
    assert res.by_level["2"].accuracy == pytest.approx(0.125)
    assert res.by_level["10"].accuracy == 1.0 and math.isnan(res.by_level["10"].stderr)
    assert res.reasons == {"correct": 7, "wrong": 9}
    d = res.to_dict()
    assert d["by_level"]["10"]["stderr"] is None  # NaN is not JSON
    rows = result_rows(res)
    assert [(r["group"], r["value"]) for r in rows] == [
        ("all", ""),
        ("subject", "Algebra"),
        ("subject", "Geometry"),
        ("level", "1"),
        ("level", "2"),
        ("level", "10"),
    ]
    table = format_table(rows, RESULT_COLUMNS)
    assert "0.4375" in table and "Geometry" in table and table.count("\n") == len(rows) + 1


def test_summarise_rejects_unequal_sample_counts():
    recs = _records({"a": [1, 0], "b": [1]}, {"a": "s", "b": "s"}, {"a": "1", "b": "1"})
    with pytest.raises(ValueError, match="different sample counts"):
        summarise(recs, checkpoint="c", benchmark="b")


def test_score_records_counts_penalised_as_wrong_and_reads_choice_letters():
    from megatron_t1.reward import RewardConfig, RewardScorer

    problems = [
        EvalProblem("m1", "b", "Compute 2+3.", "5", "arith", "1"),
        EvalProblem("g1", "b", "Pick.\n\n(A) x\n(B) y", "B", "phys", None),
    ]
    texts = [
        [
            "<think>\n2+3=5\n</think>\nThe answer is \\boxed{5}.",
            "</think>\\boxed{6}",
            "<think>\n2+3",
            "\\boxed{5}",
        ],
        ["</think>\nThe answer is \\boxed{B}.", "</think>\nThe answer is (A).", "no idea", "</think>(B)"],
    ]
    truncated = [[False, False, True, False], [False] * 4]
    tokens = [[9, 3, 4, 2], [5, 5, 2, 2]]
    with RewardScorer(RewardConfig(num_workers=0)) as scorer:
        recs = score_records(
            problems,
            texts,
            scorer,
            truncated=truncated,
            tokens=tokens,
            checkpoint="ck",
            extra=[[{"k": i} for i in range(4)] for _ in problems],
        )
    assert [r["correct"] for r in recs] == [1, 0, 0, 1, 1, 0, 0, 1]
    assert recs[2]["reason"] == "overlong" and recs[2]["reward"] == -1.0  # penalty: not counted correct
    assert recs[1]["extracted"] == "6" and recs[4]["extracted"] == "B"
    assert recs[0]["tokens"] == 9 and recs[7]["k"] == 3 and recs[5]["sample"] == 1
    assert {r["checkpoint"] for r in recs} == {"ck"}
    res = summarise(recs, checkpoint="ck", benchmark="b")
    assert res.overall.accuracy == pytest.approx(0.5)  # both problems 2/4
    assert res.overall.stderr == 0.0
