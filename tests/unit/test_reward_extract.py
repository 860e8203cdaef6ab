"""Final-answer extraction (pure string work) and the reference-answer normalisation."""

from __future__ import annotations

import pytest

from megatron_t1.reward.extract import (
    extract_answer,
    extract_choice,
    final_answer_phrase,
    gold_choice,
    last_boxed,
    split_thinking,
)
from megatron_t1.reward.math_answer import gold_text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed {5}", "5"),
        ("\\boxed\t{5}", "5"),
        ("\\fbox{7}", "7"),
        ("\\boxed 12.", "12"),
        ("\\boxed{\\boxed{3}}", "3"),
        ("\\boxed{a_{b_{c}}}", "a_{b_{c}}"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces do not close the group
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{3} wait \\boxed{\\frac{1}{2}", None),  # malformed last box: no answer, not the earlier one
        ("\\boxed{}", None),
        ("\\boxed{  }", None),
        ("no box", None),
        ("\\boxedx{3}", None),  # another command
        ("", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
        ("Final Answer: The final answer is 5. I hope it is correct.", "5"),
        ("The answer is 42.", "42"),
        ("The answer is: 3.14", "3.14"),
        ("so the answer is 5 cm. Therefore we stop.", "5 cm"),
        ("Answer: \\(\\sqrt{2}\\)", "\\sqrt{2}"),
        ("**Final Answer**\n\n$x = 3$\n", "x = 3"),
        ("**Final Answer:** **12**", "12"),
        ("The answer is \\[ 7 \\] indeed", "7"),
        ("I should check my answer\nFirst line", None),  # a bare "answer" + newline is prose
        ("nothing here", None),
    ],
)
def test_final_answer_phrase(text, expected):
    assert final_answer_phrase(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>a</think>b", ("<think>a", "b")),
        ("<think>a</think>b</think>c", ("<think>a</think>b", "c")),  # the last marker
        ("<think>still thinking", ("<think>still thinking", "")),
        ("plain text", ("", "plain text")),
        ("a</think>b", ("a", "b")),  # template put <think> in the prompt
    ],
)
def test_split_thinking(text, expected):
    assert split_thinking(text) == expected


def test_split_thinking_disabled_and_custom_marker():
    assert split_thinking("<think>a</think>b", "") == ("", "<think>a</think>b")
    assert split_thinking("x<|end_of_thought|>y", "<|end_of_thought|>") == ("x", "y")


def test_extract_answer_regions():
    text = "<think>it is \\boxed{5}</think> so \\boxed{6}"
    assert extract_answer(text) == "6"
    assert extract_answer("<think>it is \\boxed{5}") is None
    assert extract_answer("<think>it is \\boxed{5}", answer_from_thinking=True) == "5"
    assert extract_answer("<think>it is \\boxed{5}</think> no answer", answer_from_thinking=True) == "5"
    # a malformed last box wins over a phrase before it
    assert extract_answer("The answer is 4. \\boxed{\\frac{1}{2}") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Answer: C", "C"),
        ("The answer is (C).", "C"),
        ("so \\boxed{B}", "B"),
        ("\\boxed{(D)}", "D"),
        ("\\boxed{\\text{A}}", "A"),
        ("\\boxed{\\textbf{(E)}}", "E"),
        ("blah\n(C)", "C"),
        ("blah\n**C**", "C"),
        ("**Answer:** **B**", "B"),
        ("final answer: option D", "D"),
        ("The answer is Because of", None),
        ("(A) 1 (B) 2 (C) 3", None),
        ("\\boxed{42}", None),
        ("answer: a bit more", None),  # lower case letters are words, not choices
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_gold_choice_and_text():
    assert [gold_choice(g) for g in ("C", "(B)", " D ", "c", "CD", "12", "x")] == [
        "C",
        "B",
        "D",
        None,
        None,
        None,
        None,
    ]
    assert gold_text("$\\frac{1}{2}$") == "\\frac{1}{2}"
    assert gold_text("\\(x=3\\)") == "x=3"
    assert gold_text("$$7$$") == "7"
    assert gold_text("The answer is $\\boxed{12}$") == "12"
    assert gold_text("  364 ") == "364"
