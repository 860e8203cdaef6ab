"""The reward table: (response, gold) -> expected reward and reason, scored in one pool batch.

Covers every extraction form, math-verify equivalence class (with wrong answers that look alike),
malformed LaTeX, empty responses, the adversarial inputs that hang sympy without timeouts, and the
penalties. All cases go through one :class:`RewardScorer` batch, the adversarial ones in parallel.
"""

from __future__ import annotations

import time

import pytest

from megatron_t1.reward import RewardConfig, RewardScorer

NESTED = "(" * 100_000 + "1" + ")" * 100_000
LOOP = "Let me reconsider the problem from the beginning and compute the sum again. " * 40
PROSE = (
    "We start by writing the condition as an equation. Substituting the given values, the left side "
    "becomes a quadratic in $x$, whose discriminant we compute next. "
)
T1_TRACE = (
    "<think>\n385 - 48 = 327\ncheck: 327 + 48 = 375, not 385, wrong\n"
    "wait, that is wrong: I made a mistake in 385 - 48. Let me retry.\n385 - 48 = 337\n"
    "check: 337 + 48 = 385, correct\n337 + 27 = 364\ncheck: 364 - 27 = 337, correct\n"
    "</think>\nThe answer is \\boxed{364}."
)
# ~1,300 tokens of distinct steps: the 600 parentheses after them are only 30% of the response
STEPS = " ".join(f"Step {i}: adding {7 * i} and {3 * i} gives {10 * i}." for i in range(100))
PMAT = "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"

# (id, response, gold, truncated, mean_logprob, reward, reason)
CASES = [
    # --- extraction forms --------------------------------------------------------------------
    ("boxed", "So the total is \\boxed{364}.", "364", False, None, 1.0, "correct"),
    ("boxed-space", "Hence \\boxed {364}", "364", False, None, 1.0, "correct"),
    ("fbox", "Hence \\fbox{364}", "364", False, None, 1.0, "correct"),
    ("boxed-bare", "Hence \\boxed 364.", "364", False, None, 1.0, "correct"),
    ("boxed-nested", "\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", False, None, 1.0, "correct"),
    ("boxed-in-boxed", "\\boxed{\\boxed{3}}", "3", False, None, 1.0, "correct"),
    ("last-box-wins", "First \\boxed{5}. Wait, recheck: \\boxed{6}", "6", False, None, 1.0, "correct"),
    ("last-box-wins-wrong", "First \\boxed{5}. Wait, recheck: \\boxed{6}", "5", False, None, 0.0, "wrong"),
    (
        "final-answer-is",
        "The final answer is $\\frac{1}{2}$. I hope it is correct.",
        "\\frac12",
        False,
        None,
        1.0,
        "correct",
    ),
    ("final-answer-heading", "Work.\n\n**Final Answer**\n\n$x = 3$\n", "3", False, None, 1.0, "correct"),
    ("answer-colon", "Adding up, Answer: 42", "42", False, None, 1.0, "correct"),
    ("answer-is-wrong", "so the answer is 41.", "42", False, None, 0.0, "wrong"),
    (
        "think-summary",
        "<think>maybe \\boxed{5}</think> The answer is \\boxed{6}.",
        "6",
        False,
        None,
        1.0,
        "correct",
    ),
    (
        "think-summary-not-thinking",
        "<think>maybe \\boxed{5}</think> The answer is \\boxed{6}.",
        "5",
        False,
        None,
        0.0,
        "wrong",
    ),
    ("think-unclosed", "<think>so it is \\boxed{5}", "5", False, None, 0.0, "no_answer"),
    ("t1-trace", T1_TRACE, "364", False, None, 1.0, "correct"),
    # --- equivalence ---------------------------------------------------------------------------
    ("frac-decimal", "\\boxed{\\frac{1}{2}}", "0.5", False, None, 1.0, "correct"),
    ("dfrac-decimal", "\\boxed{\\dfrac{3}{4}}", "0.75", False, None, 1.0, "correct"),
    ("decimal-frac", "\\boxed{0.75}", "\\frac{3}{4}", False, None, 1.0, "correct"),
    ("frac-inverted", "\\boxed{\\frac{4}{3}}", "\\frac{3}{4}", False, None, 0.0, "wrong"),
    ("decimal-too-short", "\\boxed{0.33}", "\\frac{1}{3}", False, None, 0.0, "wrong"),
    ("decimal-6-places", "\\boxed{0.333333}", "\\frac{1}{3}", False, None, 1.0, "correct"),
    ("left-right", "\\boxed{\\left(\\frac{1}{2}\\right)}", "\\frac12", False, None, 1.0, "correct"),
    ("radical", "\\boxed{2\\sqrt{2}}", "\\sqrt{8}", False, None, 1.0, "correct"),
    ("radical-wrong", "\\boxed{\\sqrt{2}}", "\\sqrt{8}", False, None, 0.0, "wrong"),
    ("radical-swapped", "\\boxed{3\\sqrt{2}}", "2\\sqrt{3}", False, None, 0.0, "wrong"),
    ("interval", "\\boxed{[1, 3)}", "[1,3)", False, None, 1.0, "correct"),
    ("interval-closed", "\\boxed{[1,3]}", "[1,3)", False, None, 0.0, "wrong"),
    ("interval-infinity", "\\boxed{(-\\infty, 2]}", "(-\\infty,2]", False, None, 1.0, "correct"),
    ("set-order", "\\boxed{\\{3, 1, 2\\}}", "\\{1,2,3\\}", False, None, 1.0, "correct"),
    ("set-missing", "\\boxed{\\{1,2\\}}", "\\{1,2,3\\}", False, None, 0.0, "wrong"),
    ("tuple-left-right", "\\boxed{\\left(1, -2\\right)}", "(1,-2)", False, None, 1.0, "correct"),
    ("tuple-swapped", "\\boxed{(-2, 1)}", "(1,-2)", False, None, 0.0, "wrong"),
    ("equation-vs-value", "\\boxed{x = 3}", "3", False, None, 1.0, "correct"),
    ("value-vs-equation", "\\boxed{3}", "x=3", False, None, 1.0, "correct"),
    ("equation-sign", "\\boxed{x = -3}", "3", False, None, 0.0, "wrong"),
    ("line-equation", "\\boxed{y = 2x + 1}", "y=1+2x", False, None, 1.0, "correct"),
    ("polynomial", "\\boxed{(x+1)^2}", "x^2+2x+1", False, None, 1.0, "correct"),
    ("polynomial-wrong", "\\boxed{x^2+1}", "x^2+2x+1", False, None, 0.0, "wrong"),
    ("degrees", "\\boxed{90^\\circ}", "90", False, None, 1.0, "correct"),
    ("degrees-gold", "\\boxed{90}", "90^{\\circ}", False, None, 1.0, "correct"),
    ("degrees-wrong", "\\boxed{45^\\circ}", "90", False, None, 0.0, "wrong"),
    ("units", "\\boxed{5\\text{ cm}}", "5", False, None, 1.0, "correct"),
    ("units-wrong", "\\boxed{6\\text{ cm}}", "5", False, None, 0.0, "wrong"),
    ("percent-decimal", "\\boxed{0.25}", "25\\%", False, None, 1.0, "correct"),
    ("percent-number", "\\boxed{25\\%}", "25", False, None, 1.0, "correct"),
    ("percent-wrong", "\\boxed{0.52}", "25\\%", False, None, 0.0, "wrong"),
    ("text", "\\boxed{\\text{Monday}}", "Monday", False, None, 1.0, "correct"),
    ("text-wrong", "\\boxed{\\text{Tuesday}}", "\\text{Monday}", False, None, 0.0, "wrong"),
    (
        "matrix",
        f"\\boxed{{{PMAT}}}",
        "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
        False,
        None,
        1.0,
        "correct",
    ),
    ("matrix-swapped", "\\boxed{\\begin{pmatrix}2&1\\\\3&4\\end{pmatrix}}", PMAT, False, None, 0.0, "wrong"),
    ("thousands", "\\boxed{1,000,000}", "1000000", False, None, 1.0, "correct"),
    ("thousands-wrong", "\\boxed{100,000}", "1000000", False, None, 0.0, "wrong"),
    ("pi", "\\boxed{\\pi}", "\\pi", False, None, 1.0, "correct"),
    ("pi-approx", "\\boxed{3.14}", "\\pi", False, None, 0.0, "wrong"),
    ("negative", "\\boxed{-7}", "-7", False, None, 1.0, "correct"),
    ("negative-sign", "\\boxed{7}", "-7", False, None, 0.0, "wrong"),
    ("gold-dollars-boxed", "\\boxed{12}", "$\\boxed{12}$", False, None, 1.0, "correct"),
    # --- multiple choice (GPQA style) ---------------------------------------------------------
    ("mc-answer-colon", "Comparing the options, Answer: C", "C", False, None, 1.0, "correct"),
    ("mc-parenthesised", "Therefore the answer is (C).", "(C)", False, None, 1.0, "correct"),
    ("mc-boxed-wrong", "\\boxed{B}", "C", False, None, 0.0, "wrong"),
    ("mc-last-line", "Eliminating the rest:\n(D)", "D", False, None, 1.0, "correct"),
    ("mc-last-answer-wins", "The answer is (A)? No. Answer: B", "B", False, None, 1.0, "correct"),
    ("mc-options-listed-only", "(A) 1 (B) 2 (C) 3", "C", False, None, 0.0, "no_answer"),
    # --- empty and malformed -------------------------------------------------------------------
    ("empty", "", "5", False, None, 0.0, "no_answer"),
    ("whitespace", "  \n\t ", "5", False, None, 0.0, "no_answer"),
    ("unclosed-box", "so \\boxed{\\frac{1}{2}", "0.5", False, None, 0.0, "no_answer"),
    ("empty-box", "so \\boxed{}", "0", False, None, 0.0, "no_answer"),
    ("half-fraction", "\\boxed{\\frac{1}{}}", "1", False, None, 0.0, "wrong"),
    ("garbled-latex", "\\boxed{)(^_}", "1", False, None, 0.0, "wrong"),
    ("unparsable-gold", "\\boxed{5}", "", False, None, 0.0, "gold_unparsable"),
    # --- adversarial: each ends within its timeout -----------------------------------------------
    ("tower-9", "\\boxed{9^{9^{9}}}", "3", False, None, 0.0, "too_complex"),
    ("tower-2", "\\boxed{2^{2^{30}}}", "3", False, None, 0.0, "too_complex"),
    ("tower-10", "\\boxed{10^{10^{10}}}", "3", False, None, 0.0, "too_complex"),
    ("huge-binomial", "\\boxed{\\binom{10^{9}}{10^{8}}}", "3", False, None, 0.0, "too_complex"),
    ("huge-factorial", "\\boxed{(10^{100000})!}", "3", False, None, 0.0, "too_complex"),
    ("tower-gold-as-text", "\\boxed{2^{2^{30}}}", "2^{2^{30}}", False, None, 1.0, "correct"),
    ("nested-parens-100k", PROSE + f"\\boxed{{{NESTED}}}", "1", False, None, -1.0, "repetition"),
    ("expand-timeout", "\\boxed{(x+y+z+1)^{40}}", "3", False, None, 0.0, "timeout"),
    ("expand-timeout-2", "\\boxed{(a+b+c+d+e+1)^{25}}", "3", False, None, 0.0, "timeout"),
    ("product-timeout", "\\boxed{\\prod_{k=1}^{10^{6}} k}", "3", False, None, 0.0, "timeout"),
    # 600 parentheses dominate a window of the response: degenerate output, penalised before parsing
    (
        "nested-parens-300",
        STEPS + "\\boxed{" + "(" * 300 + "1" + ")" * 300 + "}",
        "1",
        False,
        None,
        -1.0,
        "repetition",
    ),
    # --- penalties (override correctness) --------------------------------------------------------
    ("overlong-correct", "So the total is \\boxed{364}.", "364", True, None, -1.0, "overlong"),
    ("overlong-no-answer", PROSE * 3, "364", True, None, -1.0, "overlong"),
    ("repetitive-correct", PROSE + LOOP + "\\boxed{364}", "364", False, None, -1.0, "repetition"),
    ("replacement-chars", "The sum is \ufffd\ufffd \\boxed{364}", "364", False, None, -1.0, "garbage"),
    ("control-chars", "The sum\x07 is \x1b[0m \\boxed{364}", "364", False, None, -1.0, "garbage"),
    (
        "mixed-scripts",
        "Итак сумма равна ответ. 所以答案是 这个数. الجواب هو العدد \\boxed{364}",
        "364",
        False,
        None,
        -1.0,
        "garbage",
    ),
    ("mixed-alphabet-words", "Thе sum оf thеsе numbеrs is \\boxed{364}", "364", False, None, -1.0, "garbage"),
    (
        "chinese-with-latin-math",
        "当x=3时, 函数f(x)的值为 所以答案是 \\boxed{364}",
        "364",
        False,
        None,
        1.0,
        "correct",
    ),
    ("low-logprob", "So the total is \\boxed{364}.", "364", False, -9.0, -1.0, "perplexity"),
    ("ok-logprob", "So the total is \\boxed{364}.", "364", False, -0.3, 1.0, "correct"),
]
CFG = RewardConfig(min_mean_logprob=-5.0)


@pytest.fixture(scope="module")
def scored():
    responses, golds = [c[1] for c in CASES], [c[2] for c in CASES]
    kw = dict(truncated=[c[3] for c in CASES], mean_logprobs=[c[4] for c in CASES])
    with RewardScorer(CFG) as scorer:
        scorer.wait_ready()
        start = time.perf_counter()
        first = scorer.score(responses, golds, **kw)
        seconds = time.perf_counter() - start
        second = scorer.score(responses, golds, **kw)
    return first, second, seconds


def test_table_is_large_and_unique():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_case(scored, index):
    batch, _, _ = scored
    name, response, gold, _, _, reward, reason = CASES[index]
    assert (batch.rewards[index], batch.reasons[index]) == (reward, reason), (
        f"{name}: extracted {batch.extracted[index]!r}, penalties {batch.penalties[index]}"
    )


def test_deterministic(scored):
    first, second, _ = scored
    assert first.rewards == second.rewards
    assert first.reasons == second.reasons
    assert first.extracted == second.extracted


def test_adversarial_within_timeouts(scored):
    """No worker had to be killed: the per-answer CPU timer and the size guard stopped every
    adversarial answer (each costs at most timeout_s of CPU). Without them the batch runs for
    minutes; the bound on wall time is loose because this machine is shared (bench/reward.py
    measures the real cost)."""
    batch, _, seconds = scored
    timeouts = batch.metrics["reward/timeouts"]
    assert timeouts == sum(c[6] == "timeout" for c in CASES)
    assert batch.metrics["reward/worker_restarts"] == 0
    assert seconds < 60, seconds


def test_metrics_count_every_detector_and_reason(scored):
    batch, _, _ = scored
    n = len(CASES)
    for reason in {c[6] for c in CASES}:
        expected = sum(c[6] == reason for c in CASES) / n
        assert batch.metrics[f"reward/reason/{reason}"] == pytest.approx(expected), reason
    # detectors are counted whenever they fire, also when another one is the reason
    assert batch.metrics["reward/penalty/overlong"] == pytest.approx(2 / n)
    assert batch.metrics["reward/mean"] == pytest.approx(sum(c[5] for c in CASES) / n)
