"""T1's -1 penalty: detectors of undesired responses (arXiv 2501.11651, Sec. 3.2).

Each detector is a named pure function of the response text (and what the engine reports) with a
config threshold; :func:`detect` returns the names of those that fire, in a fixed order, and the
first one becomes the response's reason. The penalty overrides correctness.

* ``overlong``: the engine stopped the response at the generation limit (``truncated``).
* ``repetition``: the repeated n-gram ratio ``1 - unique / total`` exceeds a threshold, over the
  whole response or over any window of ``repetition_window`` n-grams (windows start every quarter
  window), so that a loop filling only part of a long response is caught too. Text repeated r
  times scores ~``1 - 1/r``; honest self-verification ("check: 422 - 385 = 37, correct" after each
  step) repeats words but few long n-grams, since the numbers change. Tokens: ASCII words and
  digit runs (each at most 16 characters, so that "0000...0" repeats too) and every other
  non-space character.
* ``garbage``: replacement characters (U+FFFD: bytes that do not decode), control characters,
  too many writing systems, or words that mix alphabets inside the word.
* ``perplexity``: the policy's mean token log-prob is below a threshold (T1's perplexity filter).

Pure Python, linear time, no sympy: the parent re-runs it for an answer whose worker was killed.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right
from dataclasses import dataclass

from megatron_t1.reward.config import RewardConfig

__all__ = ["DETECTORS", "GarbageStats", "detect", "garbage_stats", "repetition_ratio", "tokenize"]

DETECTORS = ("overlong", "repetition", "garbage", "perplexity")
"""Detector names in priority order (the first that fires is the reason)."""

_TOKEN = re.compile(r"[A-Za-z]{1,16}|\d{1,16}|[^\sA-Za-z\d]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_WORD = re.compile(r"[^\W\d_]{2,}")

# Script of a letter, by code-point ranges (start, name); "" = not counted (Greek is mathematical
# notation, combining marks and symbols belong to no script here).
_RANGES = (
    (0x0000, "latin"),
    (0x0250, ""),
    (0x0370, ""),
    (0x0400, "cyrillic"),
    (0x0530, "armenian"),
    (0x0590, "hebrew"),
    (0x0600, "arabic"),
    (0x0780, ""),
    (0x0900, "indic"),
    (0x0E00, "thai"),
    (0x0E80, ""),
    (0x10A0, "georgian"),
    (0x1100, "cjk"),
    (0x1200, ""),
    (0x1E00, "latin"),
    (0x1F00, ""),
    (0x2E80, "cjk"),
    (0xA000, ""),
    (0xAC00, "cjk"),
    (0xD7B0, ""),
    (0xF900, "cjk"),
    (0xFB00, ""),
    (0xFE70, "arabic"),
    (0xFF00, ""),
    (0x20000, "cjk"),
    (0x30000, ""),
)
_STARTS = [start for start, _ in _RANGES]
# Deletes ASCII letters: len(text) - len(text.translate(_DROP_ASCII_LETTERS)) counts them in C.
_DROP_ASCII_LETTERS = dict.fromkeys(map(ord, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))


def _script(ch: str) -> str:
    return _RANGES[bisect_right(_STARTS, ord(ch)) - 1][1]


def tokenize(text: str) -> list[str]:
    """Tokens of the repetition detector: ASCII words and digit runs (<= 16 chars), other chars."""
    return _TOKEN.findall(text)


def repetition_ratio(text: str, n: int, window: int | None = None) -> tuple[float, int]:
    """``(ratio, n_tokens)``: ratio = 1 - unique/total over the n-grams of :func:`tokenize`, the
    largest of the whole response's and (``window`` given) that of every window of ``window``
    n-grams starting at multiples of ``window // 4``. 0 without n-grams."""
    tokens = tokenize(text)
    # hash each n-gram once: sets of ints are much cheaper than sets of n-tuples (whose hash is
    # recomputed on every insertion); a 64-bit collision would only lower the ratio slightly
    grams = list(map(hash, zip(*(tokens[i:] for i in range(n)))))
    total = len(grams)
    if total == 0:
        return 0.0, len(tokens)
    ratio = 1.0 - len(set(grams)) / total
    if window is not None and total > window:
        for start in range(0, total - window + window // 4, max(window // 4, 1)):
            part = grams[start : start + window]
            ratio = max(ratio, 1.0 - len(set(part)) / len(part))
    return ratio, len(tokens)


@dataclass(frozen=True)
class GarbageStats:
    """What the garbage detector counts in one response."""

    replacement: int
    """U+FFFD characters."""
    control: int
    """C0/C1 control characters other than tab, newline and carriage return."""
    scripts: dict[str, int]
    """Letters per writing system (Greek not counted)."""
    mixed_words: int
    """Words mixing two alphabets, or CJK and a non-Latin alphabet (Chinese text glues Latin
    variables to Han characters, "当x=1时", so CJK next to Latin is not mixing)."""


def garbage_stats(text: str) -> GarbageStats:
    """Count replacement / control characters, letters per script and mixed-alphabet words."""
    replacement = text.count("\ufffd")
    control = len(_CONTROL.findall(text))
    if text.isascii():  # the common case: C-speed passes only, no per-character Python
        letters = len(text) - len(text.translate(_DROP_ASCII_LETTERS))
        return GarbageStats(replacement, control, {"latin": letters}, 0)
    scripts: dict[str, int] = {}
    mixed = 0
    for m in _WORD.finditer(text):
        word = m.group(0)
        if word.isascii():
            scripts["latin"] = scripts.get("latin", 0) + len(word)
            continue
        seen: set[str] = set()
        for ch in word:
            if unicodedata.combining(ch):
                continue
            s = _script(ch)
            if s:
                scripts[s] = scripts.get(s, 0) + 1
                seen.add(s)
        alphabets = seen - {"cjk"}
        # two alphabets in one word, or CJK glued to a non-Latin alphabet ("的из")
        if len(alphabets) >= 2 or ("cjk" in seen and alphabets - {"latin"}):
            mixed += 1
    return GarbageStats(replacement, control, scripts, mixed)


def is_garbage(stats: GarbageStats, cfg: RewardConfig) -> bool:
    """The garbage rule on :class:`GarbageStats` with the ``garbage_*`` thresholds of ``cfg``."""
    major = sum(count >= cfg.garbage_script_min_letters for count in stats.scripts.values())
    return (
        stats.replacement > cfg.garbage_max_replacement_chars
        or stats.control > cfg.garbage_max_control_chars
        or major > cfg.garbage_max_scripts
        or stats.mixed_words > cfg.garbage_max_mixed_words
    )


def detect(
    response: str, *, truncated: bool, mean_logprob: float | None, cfg: RewardConfig
) -> tuple[str, ...]:
    """Names of the enabled detectors that fire on ``response``, in :data:`DETECTORS` order."""
    fired = []
    if cfg.overlong_enabled and truncated:
        fired.append("overlong")
    if cfg.repetition_enabled:
        ratio, n_tokens = repetition_ratio(response, cfg.repetition_ngram, cfg.repetition_window)
        if n_tokens >= cfg.repetition_min_tokens and ratio > cfg.repetition_threshold:
            fired.append("repetition")
    if cfg.garbage_enabled and is_garbage(garbage_stats(response), cfg):
        fired.append("garbage")
    if cfg.min_mean_logprob is not None and mean_logprob is not None and mean_logprob < cfg.min_mean_logprob:
        fired.append("perplexity")
    return tuple(fired)
