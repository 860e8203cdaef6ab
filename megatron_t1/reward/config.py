"""The ``reward`` config section: T1's rule-based reward r in {1, 0, -1} (arXiv 2501.11651, Sec. 3.2).

Plain types only (int / float / bool / str / X | None), each with a default, so that the run config
(:mod:`megatron_t1.config`) can re-export this class and load it from YAML strictly. Validation in
``__post_init__`` raises ``ValueError`` with a message that names the field.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RewardConfig:
    """Scoring of final answers (math-verify in worker processes) and the -1 penalty detectors."""

    correct: float = 1.0
    """Reward of a response whose final answer equals the reference."""
    wrong: float = 0.0
    """Reward of a wrong, missing, unparsable or timed-out answer."""
    penalty: float = -1.0
    """Reward of an undesired response (any enabled detector fired); overrides correctness."""

    num_workers: int = 2
    """Worker processes (fresh interpreters) that extract and verify answers. 0 scores in the calling process:
    the per-answer timeout still applies there (main thread only) but no wall-clock guard does,
    so 0 is for debugging and single-process benchmarks only."""
    timeout_s: float = 1.0
    """Per-answer budget in CPU seconds (parse + verify), enforced in the worker by a SIGPROF
    timer (``setitimer(ITIMER_PROF)``, sub-second). CPU rather than wall time, so that a busy
    machine does not turn slow-but-correct answers into timeouts (the reward stays a function of
    the batch). A timed-out answer scores ``wrong`` with reason ``timeout``."""
    wall_guard_s: float = 1.5
    """Parent-side guard (> timeout_s): an answer that has run this many wall seconds while its
    worker used more than timeout_s + 0.25 CPU seconds on it is stuck in a C call that ignores the
    timer; the worker is killed and replaced and the answer scores ``wrong`` (``timeout``)."""
    stall_guard_s: float = 10.0
    """Parent-side guard (>= wall_guard_s): an answer still running after this many wall seconds
    whose worker used no CPU for a second is killed (a stopped or blocked worker)."""
    worker_start_timeout_s: float = 120.0
    """Seconds a new worker may take to import math-verify and warm up before scoring fails."""
    max_answer_chars: int = 2000
    """Extracted answers longer than this are not parsed (reason ``too_complex``): it bounds the
    parser's work on pathological inputs such as 100k nested parentheses."""
    max_number_bits: int = 1_000_000
    """Numbers whose estimated size exceeds this many bits (e.g. ``2^{2^{30}}``) are not compared
    symbolically, only as text: sympy would spend minutes in C building them. 0 disables."""

    thinking_end: str = "</think>"
    """Marker that closes the thinking; the final answer is read from the text after the last one
    (the summary). Without the marker the whole response is the summary; with an opening
    ``<think>`` but no closing marker there is no summary. Empty string disables the split."""
    answer_from_thinking: bool = False
    """Fall back to the thinking when the summary holds no answer."""

    overlong_enabled: bool = True
    """Detector ``overlong``: the engine reports the response hit the generation limit."""
    repetition_enabled: bool = True
    """Detector ``repetition``: the repeated n-gram ratio exceeds ``repetition_threshold``."""
    repetition_ngram: int = 12
    """n of the n-grams (tokens: ASCII words, digit runs, single other characters)."""
    repetition_threshold: float = 0.5
    """Fires when 1 - unique/total n-grams exceeds this, over the whole response or any window; a
    text repeated r times scores ~1 - 1/r. Calibrated to zero false positives on the synthetic SFT
    traces (their "check: ..., correct" lines repeat by design; max 0.37) with loops at >= 0.64."""
    repetition_window: int = 1000
    """Window (in n-grams) over which the ratio is also taken, so a loop that fills only part of a
    long response counts."""
    repetition_min_tokens: int = 200
    """Responses shorter than this many tokens are never flagged as repetitive."""
    garbage_enabled: bool = True
    """Detector ``garbage``: replacement or control characters, or mixed scripts."""
    garbage_max_replacement_chars: int = 0
    """Fires when the response holds more U+FFFD (undecodable bytes) than this."""
    garbage_max_control_chars: int = 0
    """Fires when the response holds more control characters (C0/C1, not tab/newline/CR) than this."""
    garbage_max_scripts: int = 2
    """Fires when more writing systems than this (Latin, CJK, Cyrillic, Arabic, ...; Greek is
    ignored as mathematical notation) each have at least ``garbage_script_min_letters`` letters."""
    garbage_script_min_letters: int = 8
    """Letters a script needs before it counts toward ``garbage_max_scripts``."""
    garbage_max_mixed_words: int = 2
    """Fires when more words than this mix alphabetic scripts inside the word (e.g. Latin and
    Cyrillic, "thеorem" with a Cyrillic e). CJK and Greek next to Latin are normal and ignored."""
    min_mean_logprob: float | None = None
    """Detector ``perplexity`` (T1's perplexity filter): fires when the policy's mean token
    log-prob of the response is below this (nats). None disables it."""

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"reward.{field} must be {rule}, got {getattr(self, field)!r}")

        need(self.num_workers >= 0, "num_workers", ">= 0")
        need(self.timeout_s > 0, "timeout_s", "> 0")
        need(self.wall_guard_s > self.timeout_s, "wall_guard_s", f"> timeout_s ({self.timeout_s})")
        need(
            self.stall_guard_s >= self.wall_guard_s, "stall_guard_s", f">= wall_guard_s ({self.wall_guard_s})"
        )
        need(self.worker_start_timeout_s > 0, "worker_start_timeout_s", "> 0")
        need(self.max_answer_chars > 0, "max_answer_chars", "> 0")
        need(self.max_number_bits >= 0, "max_number_bits", ">= 0 (0 disables the guard)")
        need(self.repetition_ngram >= 1, "repetition_ngram", ">= 1")
        need(0.0 < self.repetition_threshold < 1.0, "repetition_threshold", "in (0, 1)")
        need(self.repetition_window >= 4, "repetition_window", ">= 4")
        need(
            self.repetition_min_tokens >= self.repetition_ngram,
            "repetition_min_tokens",
            f">= repetition_ngram ({self.repetition_ngram})",
        )
        need(self.garbage_max_replacement_chars >= 0, "garbage_max_replacement_chars", ">= 0")
        need(self.garbage_max_control_chars >= 0, "garbage_max_control_chars", ">= 0")
        need(self.garbage_max_scripts >= 1, "garbage_max_scripts", ">= 1")
        need(self.garbage_script_min_letters >= 1, "garbage_script_min_letters", ">= 1")
        need(self.garbage_max_mixed_words >= 0, "garbage_max_mixed_words", ">= 0")
        need(
            self.min_mean_logprob is None or self.min_mean_logprob <= 0,
            "min_mean_logprob",
            "None or <= 0 (a log-probability)",
        )
        for name in ("correct", "wrong", "penalty"):
            need(isinstance(getattr(self, name), (int, float)), name, "a number")
