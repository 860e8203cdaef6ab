"""The synthetic arithmetic task: determinism, split, answers, and the honesty of the traces."""

from __future__ import annotations

import random
import re

import pytest

from megatron_t1.data import synthetic as syn

_STEP = re.compile(r"^(-?\d+) ([+-]) (\d+) = (-?\d+)$")
_CHECK = re.compile(r"^check: (-?\d+) ([+-]) (\d+) = (-?\d+), (correct|not (-?\d+), wrong)$")


def _evaluate(question: str) -> int:
    """Independent reference: parse 'Compute a op b op c.' and fold left to right."""
    body = question.removeprefix("Compute ").removesuffix(".")
    toks = body.split(" ")
    value = int(toks[0])  # operands are >= 0 in questions; results may be negative
    for op, b in zip(toks[1::2], toks[2::2]):
        value = value + int(b) if op == "+" else value - int(b)
    return value


def test_problems_are_deterministic_and_seed_dependent():
    a = syn.make_problems(200, 3)
    assert a == syn.make_problems(200, 3)
    assert a != syn.make_problems(200, 4)
    assert syn.make_sft_examples(100, 5) == syn.make_sft_examples(100, 5)
    assert syn.make_sft_examples(100, 5) != syn.make_sft_examples(100, 6)


def test_train_and_heldout_are_disjoint_for_any_seeds():
    kw = dict(n_operands=(2, 3), digits=(1, 1))  # a small space makes collisions likely if the split leaked
    train = {p.question for s in (0, 1) for p in syn.make_problems(1500, s, "train", **kw)}
    held = {p.question for s in (0, 1) for p in syn.make_problems(120, s, "heldout", **kw)}
    assert train.isdisjoint(held)
    assert all(syn.is_heldout(q) for q in held) and not any(syn.is_heldout(q) for q in train)
    sft_q = {ex["messages"][0]["content"].split("\n")[0] for ex in syn.make_sft_examples(500, 0)}
    assert sft_q.isdisjoint({p.question for p in syn.make_problems(500, 0, "heldout")})


def test_problems_are_distinct_and_the_answer_is_right():
    probs = syn.make_problems(500, 1, "heldout", n_operands=(2, 5), digits=(1, 3))
    assert len({p.question for p in probs}) == 500
    for p in probs:
        assert int(p.answer) == _evaluate(p.question)
        assert str(int(p.answer)) == p.answer


def test_difficulty_knobs_are_respected():
    rng = random.Random(0)
    for _ in range(300):
        p = syn.make_problem(rng, n_operands=(2, 4), digits=(2, 3))
        assert 2 <= len(p.operands) <= 4 and len(p.ops) == len(p.operands) - 1
        assert all(2 <= len(str(x)) <= 3 for x in p.operands)
        value = p.operands[0]
        for op, b in zip(p.ops, p.operands[1:]):
            value = value + b if op == "+" else value - b
            assert value >= 0  # allow_negative=False: every intermediate result is >= 0
    with pytest.raises(ValueError, match="n_operands"):
        syn.make_problem(rng, n_operands=(1, 3))
    with pytest.raises(ValueError, match="space too small"):
        syn.make_problems(100, 0, "heldout", n_operands=(2, 2), digits=(1, 1))
    with pytest.raises(ValueError, match="split"):
        syn.make_problems(5, 0, "test")


def test_prompt_template():
    msgs = syn.prompt_messages("Compute 1 + 2.")
    assert msgs == [{"role": "user", "content": "Compute 1 + 2.\n" + syn.BOXED_INSTRUCTION}]
    assert "\\boxed{}" in syn.BOXED_INSTRUCTION
    with_sys = syn.prompt_messages("Compute 1 + 2.", system="Be brief.")
    assert with_sys[0] == {"role": "system", "content": "Be brief."} and with_sys[1] == msgs[0]


@pytest.mark.parametrize("restate, allow_negative", [(True, False), (False, False), (True, True)])
def test_traces_are_honest_and_end_in_the_answer(restate, allow_negative):
    examples = syn.make_sft_examples(
        300,
        2,
        truncated_fraction=0.0,
        error_rate=0.5,
        restate=restate,
        n_operands=(2, 5),
        digits=(1, 3),
        allow_negative=allow_negative,
    )
    n_wrong = 0
    for ex in examples:
        user, asst = ex["messages"]
        assert user["role"] == "user" and asst["role"] == "assistant"
        text = asst["content"]
        assert syn.last_boxed(text) == ex["answer"] == str(_evaluate(user["content"].split("\n")[0]))
        assert text.startswith("<think>\n") and text.endswith(syn.answer_line(ex["answer"]))
        thinking = text[len("<think>\n") : text.index("</think>")]
        lines = thinking.strip("\n").split("\n")
        last_step = None
        for i, line in enumerate(lines):
            if m := _STEP.match(line):
                last_step = (int(m[1]), m[2], int(m[3]), int(m[4]))
                continue
            if m := _CHECK.match(line):
                w, inv, b, back = int(m[1]), m[2], int(m[3]), int(m[4])
                assert (w - b if inv == "-" else w + b) == back  # every check is arithmetically true
                a, op, b0, written = last_step
                assert (w, b) == (written, b0) and inv == ("-" if op == "+" else "+")
                true = a + b0 if op == "+" else a - b0
                assert (m[5] == "correct") == (written == true)  # 'correct' exactly when the attempt was
                if m[5] != "correct":
                    n_wrong += 1
                    assert int(m[6]) == a
                    assert f"{a} {op} {b0}" in lines[i + 1]  # a reflection naming the failed step
                continue
            if line.startswith("now: "):
                assert restate and line.split(" ")[1] == str(true)
                continue
            assert "mistake" in line or "check fails" in line, line
        assert (last_step[0] + last_step[2] if last_step[1] == "+" else last_step[0] - last_step[2]) == int(
            ex["answer"]
        )
    assert n_wrong > 100  # error_rate=0.5 produces many caught mistakes


def test_truncated_thinking_examples():
    examples = syn.make_sft_examples(400, 3, truncated_fraction=0.3)
    trunc = [ex for ex in examples if "mask_prefix_chars" in ex["messages"][-1]]
    assert 0.2 < len(trunc) / len(examples) < 0.4
    for ex in trunc:
        msg = ex["messages"][-1]
        k = msg["mask_prefix_chars"]
        prefix, rest = msg["content"][:k], msg["content"][k:]
        assert prefix.startswith("<think>\n") and prefix.endswith("\n</think>\n")
        assert prefix.count("</think>") == 1
        assert rest == syn.answer_line(ex["answer"])
        assert syn.close_thinking(prefix[: -len("</think>\n")]) == prefix
    none = syn.make_sft_examples(200, 3, truncated_fraction=0.0)
    assert not any("mask_prefix_chars" in ex["messages"][-1] for ex in none)


def test_scoring_helpers():
    assert syn.last_boxed("a \\boxed{1} b \\boxed{ 42 }.") == "42"
    assert syn.last_boxed("no box") is None
    assert syn.is_correct("The answer is \\boxed{042}.", "42")
    assert not syn.is_correct("The answer is \\boxed{41}.", "42")
    assert not syn.is_correct("The answer is \\boxed{x}.", "42")
