"""The -1 penalty detectors, their calibration, and the reward config's validation."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_t1.reward import RewardConfig
from megatron_t1.reward.penalties import detect, garbage_stats, repetition_ratio, tokenize

CFG = RewardConfig()


def _fires(text: str, cfg: RewardConfig = CFG, truncated: bool = False, lp: float | None = None):
    return detect(text, truncated=truncated, mean_logprob=lp, cfg=cfg)


def t1_trace(rng_seed: int, steps: int = 12) -> str:
    """A long hand-written-style T1 trace: attempts, "check: ..., correct", retries that repeat the
    same wrong attempt verbatim, reflections, a boxed answer."""
    import random

    rng = random.Random(rng_seed)
    value = rng.randint(100, 999)
    lines = ["<think>", f"Compute the chain starting from {value}."]
    for _ in range(steps):
        b, op = rng.randint(2, 999), rng.choice("+-")
        true = value + b if op == "+" else value - b
        for attempt in range(3):
            wrong = true + rng.choice((-10, 10))
            last = attempt == 2 or rng.random() < 0.5
            got = true if last else wrong
            lines.append(f"{value} {op} {b} = {got}")
            inverse, back = ("-", got - b) if op == "+" else ("+", got + b)
            verdict = "correct" if got == true else f"not {value}, wrong"
            lines.append(f"check: {got} {inverse} {b} = {back}, {verdict}")
            if got == true:
                break
            lines.append(f"wait, that is wrong: I made a mistake in {value} {op} {b}. Let me retry.")
            if rng.random() < 0.5:  # the same slip again, verbatim
                lines.append(f"{value} {op} {b} = {got}")
                lines.append(f"check: {got} {inverse} {b} = {back}, not {value}, wrong")
                lines.append("wait, that is wrong again. Let me retry more carefully.")
        value = true
    lines += [
        "Let me verify the whole chain once more: every check above says correct.",
        "</think>",
        f"The answer is \\boxed{{{value}}}.",
    ]
    return "\n".join(lines)


SOLUTION = (
    "We need the number of ordered pairs $(a, b)$ of positive integers with $a + b = 2024$ and "
    "$\\gcd(a, b) = 1$. Since $\\gcd(a, b) = \\gcd(a, a + b) = \\gcd(a, 2024)$, we count the $a$ in "
    "$[1, 2023]$ coprime to $2024 = 2^3 \\cdot 11 \\cdot 23$. By Euler's totient function, "
    "$\\varphi(2024) = 2024 \\cdot \\frac{1}{2} \\cdot \\frac{10}{11} \\cdot \\frac{22}{23} = 880$. "
    "Let me double-check the factorisation: $8 \\cdot 253 = 2024$ and $253 = 11 \\cdot 23$, correct. "
    "Now check with a smaller case to be safe: for $a + b = 10$, the pairs with $\\gcd(a, b) = 1$ are "
    "$(1, 9), (3, 7), (7, 3), (9, 1)$, that is $4 = \\varphi(10)$, correct. Wait, I should make sure "
    "that $a = 2024$ is excluded: $b$ must be positive, so $a \\le 2023$, and $\\gcd(2024, 2024) \\ne 1$ "
    "anyway, so the count is unchanged. Hence there are $880$ ordered pairs.\n\n"
    "**Final Answer**\n\\[\\boxed{880}\\]"
)


# --------------------------------------------------------------------------------------------------
# repetition
# --------------------------------------------------------------------------------------------------


def test_repetition_ratio_closed_form():
    """L distinct tokens repeated r times: L unique n-grams among r*L - n + 1."""
    n = 5
    for L, r in [(20, 2), (20, 5), (50, 3), (7, 10)]:
        text = " ".join(f"w{i}" for i in range(L)).replace("w", "word") + " "
        tokens = tokenize(text * r)
        assert len(tokens) == 2 * L * r  # "word" and the digit run
        ratio, count = repetition_ratio(text * r, n)
        total = 2 * L * r - n + 1
        assert count == 2 * L * r
        assert ratio == pytest.approx(1 - 2 * L / total)


def test_repetition_ratio_edges():
    assert repetition_ratio("", 4) == (0.0, 0)
    assert repetition_ratio("a b c", 4) == (0.0, 3)
    assert repetition_ratio("a b c d", 4) == (0.0, 4)


def test_tokenize_splits_long_runs():
    assert tokenize("abc 12 x+y") == ["abc", "12", "x", "+", "y"]
    assert tokenize("0" * 40) == ["0" * 16, "0" * 16, "0" * 8]
    assert tokenize("的的") == ["的", "的"]


@pytest.mark.parametrize("loop_tokens, fires", [(200, False), (400, False), (700, True), (3000, True)])
def test_repetition_fires_on_a_loop_inside_a_long_response(loop_tokens, fires):
    """~3,000 tokens of distinct steps with a loop in the middle: a window of 1,000 n-grams around
    the loop scores ~loop/1000, whatever the length of the rest."""
    steps = [f"Step {i}: we add {7 * i} and {3 * i} to get {10 * i}." for i in range(200)]
    sentence = "So the value is the same as before, let me compute it again. "
    loop = sentence * round(loop_tokens / len(tokenize(sentence)))
    text = " ".join(steps[:100]) + " " + loop + " ".join(steps[100:])
    whole, _ = repetition_ratio(text, CFG.repetition_ngram)
    assert whole < CFG.repetition_threshold or loop_tokens >= 3000  # the whole-text ratio alone misses it
    windowed, _ = repetition_ratio(text, CFG.repetition_ngram, CFG.repetition_window)
    assert ("repetition" in _fires(text)) is fires, windowed


def test_repetition_whole_response_catches_spread_out_copies():
    """The same 1,500-token text three times: no window sees a repeat, the whole response does."""
    essay = " ".join(f"Step {i}: we add {7 * i} and {3 * i} to get {10 * i}." for i in range(100))
    assert repetition_ratio(essay, CFG.repetition_ngram, CFG.repetition_window)[0] < 0.05
    assert _fires((essay + " ") * 3) == ("repetition",)


@pytest.mark.parametrize("text", ["0" * 5000, "的" * 3000, "ha" * 3000, "\\left(" * 800])
def test_repetition_fires_on_degenerate_runs(text):
    assert _fires(text) == ("repetition",)


def test_repetition_needs_min_tokens():
    short = "check: correct. " * 40  # 160 tokens
    assert _fires(short) == ()
    assert _fires(short, dataclasses.replace(CFG, repetition_min_tokens=20)) == ("repetition",)


@pytest.mark.parametrize("seed", range(20))
def test_repetition_no_false_positive_on_t1_style_traces(seed):
    text = t1_trace(seed, steps=6 + seed)
    # calibrated without the length gate: the ratio itself stays under the threshold
    ratio, _ = repetition_ratio(text, CFG.repetition_ngram)
    assert ratio < CFG.repetition_threshold, ratio
    assert _fires(text, dataclasses.replace(CFG, repetition_min_tokens=CFG.repetition_ngram)) == ()


def test_repetition_no_false_positive_on_synthetic_sft_traces():
    """The data helper's generator (megatron_t1.data.synthetic.make_sft_examples(n, seed)): 2 x 500
    traces never fire, even without the length gate (skipped until that module exists)."""
    synthetic = pytest.importorskip("megatron_t1.data.synthetic")
    cfg = dataclasses.replace(CFG, repetition_min_tokens=CFG.repetition_ngram)
    examples = synthetic.make_sft_examples(500, 0) + synthetic.make_sft_examples(500, 1)
    ratios = []
    for ex in examples:
        trace = ex["messages"][-1]["content"]
        assert "check:" in trace or "answer" in trace
        ratios.append(repetition_ratio(trace, cfg.repetition_ngram)[0])
        assert _fires(trace, cfg) == (), trace
    assert max(ratios) < cfg.repetition_threshold - 0.1  # margin, not a coin flip


def test_no_false_positive_on_a_long_solution():
    assert _fires(SOLUTION) == ()


# --------------------------------------------------------------------------------------------------
# garbage
# --------------------------------------------------------------------------------------------------


def test_garbage_stats_counts():
    s = garbage_stats("ab\ufffd\x00\t\n\r\x1b\x85 Привет мир 你好")
    assert s.replacement == 1
    assert s.control == 3  # \x00 \x1b \x85; tab, newline, CR are fine
    assert s.scripts == {"latin": 2, "cyrillic": 9, "cjk": 2}
    assert s.mixed_words == 0
    assert garbage_stats("Thе оne").mixed_words == 2  # Cyrillic е and о inside Latin words
    assert garbage_stats("当x=1时 的из").mixed_words == 1  # Han + Latin is normal, Han + Cyrillic is not


@pytest.mark.parametrize(
    "text, fires",
    [
        (SOLUTION, False),
        ("Решим уравнение $x^2 = 4$: получаем $x = 2$. Ответ: \\boxed{2}", False),  # Cyrillic + Latin
        ("设 $x = 2$，则 $f(x) = 4$，所以答案是 \\boxed{4}", False),  # CJK + Latin
        ("Let α + β = π where θ is the angle, 所以 \\boxed{1}", False),  # Greek does not count
        ("数学问题的答案是一个整数 математика mathematics رياضيات", True),  # four scripts
        ("The result\ufffd is 5", True),
        ("The result\x00 is 5", True),
        ("Thе rеsult оf thе sum", True),  # homoglyph soup
    ],
)
def test_garbage(text, fires):
    assert ("garbage" in _fires(text)) is fires


def test_garbage_thresholds_follow_config():
    text = "The result\ufffd\ufffd is 5"
    assert "garbage" in _fires(text)
    assert "garbage" not in _fires(text, dataclasses.replace(CFG, garbage_max_replacement_chars=2))
    assert "garbage" not in _fires(text, dataclasses.replace(CFG, garbage_enabled=False))


# --------------------------------------------------------------------------------------------------
# perplexity, order, switches
# --------------------------------------------------------------------------------------------------


def test_perplexity_filter():
    cfg = dataclasses.replace(CFG, min_mean_logprob=-4.0)
    assert _fires("fine", cfg, lp=-3.9) == ()
    assert _fires("fine", cfg, lp=-4.1) == ("perplexity",)
    assert _fires("fine", cfg, lp=None) == ()
    assert _fires("fine", CFG, lp=-100.0) == ()  # off by default


def test_every_firing_detector_is_reported_in_order():
    cfg = dataclasses.replace(CFG, min_mean_logprob=-1.0)
    text = "Thе rеsult оf thе sum " + "ha " * 400
    assert _fires(text, cfg, truncated=True, lp=-2.0) == ("overlong", "repetition", "garbage", "perplexity")
    off = dataclasses.replace(
        cfg, overlong_enabled=False, repetition_enabled=False, garbage_enabled=False, min_mean_logprob=None
    )
    assert _fires(text, off, truncated=True, lp=-2.0) == ()


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("timeout_s", 0.0),
        ("wall_guard_s", 0.5),  # must exceed timeout_s
        ("num_workers", -1),
        ("repetition_threshold", 1.5),
        ("repetition_ngram", 0),
        ("repetition_min_tokens", 3),
        ("garbage_max_scripts", 0),
        ("min_mean_logprob", 0.5),
        ("max_number_bits", -1),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"reward\.{field}"):
        RewardConfig(**{field: value})


def test_config_is_plain_types():
    for f in dataclasses.fields(RewardConfig):
        assert f.default is not dataclasses.MISSING, f.name
        assert f.default is None or type(f.default) in (int, float, bool, str), f.name
