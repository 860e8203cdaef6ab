"""Integration on real data: the final answers of CHAMP's 270 reference solutions (champ-dataset,
MIT), extracted and verified by the same code that scores model responses, against CHAMP's answers.

The agreement is a regression sentinel for extraction + verification: it was 90/270 (33.3%) when
this test was written (math-verify 0.9.0). Most misses are answers that are prose ("No", "0 is the
only possible value") or that the solution states in words; a drop below the floor means a change
in ``extract_answer``, ``math_answer`` or math-verify lost answers it used to verify.
"""

from __future__ import annotations

import pytest

pytest.importorskip("champ_dataset")

MEASURED = 90  # of 270, at the time of writing
FLOOR = MEASURED - 2  # slack for benign changes in math-verify's edge cases


def test_champ_reference_answers_agree_with_gold():
    from megatron_t1.eval.loaders import champ_final_answer, champ_problems
    from megatron_t1.reward import RewardConfig, RewardScorer

    problems = champ_problems()
    assert len(problems) == 270
    responses = []
    for p in problems:
        ans = champ_final_answer(p.solution)
        thinking = p.solution.replace("@@", "")
        # a T1-style response: the reference solution as thinking, its final answer boxed
        responses.append(f"<think>\n{thinking}\n</think>\nThe answer is \\boxed{{{ans or ''}}}.")
    # in-process scoring (the workers run the same handler): no pool start-up in the test
    cfg = RewardConfig(num_workers=0, repetition_enabled=False, garbage_enabled=False)
    with RewardScorer(cfg) as scorer:
        batch = scorer.score(responses, [p.answer for p in problems], truncated=[False] * len(problems))
    agree = sum(r == cfg.correct for r in batch.rewards)
    by_cat: dict[str, list[int]] = {}
    for p, r in zip(problems, batch.rewards):
        by_cat.setdefault(p.subject, []).append(int(r == cfg.correct))
    print(
        f"\nCHAMP agreement: {agree}/270 = {agree / 270:.1%}; "
        + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in sorted(by_cat.items()))
    )
    assert batch.metrics["reward/timeouts"] == 0
    assert agree >= FLOOR, f"CHAMP agreement fell to {agree}/270 (was {MEASURED})"
    # a final answer identical to the gold must verify whatever its form (numbers, expressions, sets)
    same = [i for i, p in enumerate(problems) if champ_final_answer(p.solution) == p.answer.strip()]
    assert len(same) >= 25
    assert [i for i in same if batch.rewards[i] != cfg.correct] == []
