"""Answer equivalence with math-verify, plus the guards that keep it from hanging.

math-verify (HuggingFace) parses LaTeX into sympy and compares with numeric, symbolic, set,
interval, relation and matrix rules: ``\\frac12 == 0.5``, ``2\\sqrt2 == \\sqrt8``, ``x = 3 == 3``,
``90^\\circ == 90``, ``1,000 == 1000``, ``\\text{Monday} == Monday``. We never hand-write a
comparator; this module only

* builds the strings math-verify parses (the gold and the extracted answer, each as ``\\boxed{.}``),
* bounds the work: its own timeouts use ``signal.alarm`` (whole wall seconds, main thread only, and
  a ``TimeoutException`` that it swallows in places), so we turn them off and arm a CPU-time
  ``setitimer`` ourselves (:func:`answer_timeout`), and
* refuses numbers whose size alone would take sympy minutes inside one C call, which no signal
  interrupts (``9^{9^{9}}`` has ~3.7e8 digits): :func:`too_large` bounds log2 of every numeric
  node before anything is evaluated.

Imported only inside worker processes (and the in-process scorer): importing sympy costs ~0.5 s.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from megatron_t1.reward.extract import last_boxed

__all__ = [
    "AnswerTimeout",
    "answer_timeout",
    "gold_text",
    "is_equivalent",
    "parse_math",
    "quiet_math_verify",
    "too_large",
    "warm_up",
]

_DELIMS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))


class AnswerTimeout(BaseException):
    """Raised by the SIGPROF handler of :func:`answer_timeout`.

    A BaseException on purpose: math-verify and sympy catch ``Exception`` in many places and would
    swallow it, turning a timeout into "wrong" and running on.
    """


def _raise_timeout(signum: int, frame: Any) -> None:
    raise AnswerTimeout()


@contextmanager
def answer_timeout(seconds: float) -> Iterator[None]:
    """Raise :class:`AnswerTimeout` in this (main) thread after ``seconds`` of CPU time.

    ``setitimer(ITIMER_PROF)`` counts the process's user + system CPU, so sub-second budgets work
    and a loaded machine does not shrink them (``ITIMER_REAL`` would). It counts every thread of
    the process: meant for single-threaded worker processes. A signal handler only runs between
    Python bytecodes: a single long C call overruns it, which is why the pool adds a parent-side
    guard.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("answer_timeout needs the main thread (SIGPROF); score in worker processes")
    previous = signal.signal(signal.SIGPROF, _raise_timeout)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def quiet_math_verify() -> None:
    """Silence math-verify's per-call warnings (we disable its timeouts on purpose)."""
    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def gold_text(gold: str) -> str:
    """The reference answer as bare LaTeX: strips ``$..$`` / ``\\(..\\)`` / ``\\[..\\]`` and a ``\\boxed``."""
    text = gold.strip()
    if "\\boxed" in text or "\\fbox" in text:
        inner = last_boxed(text)
        if inner is not None:
            return inner
    for open_, close in _DELIMS:
        if text.startswith(open_) and text.endswith(close) and len(text) > len(open_) + len(close):
            return text[len(open_) : -len(close)].strip()
    return text


# --------------------------------------------------------------------------------------------------
# Size guard
# --------------------------------------------------------------------------------------------------


def _log2_bound(e: Any, max_bits: float) -> float | None:
    """Upper bound on log2 |value| of numeric node ``e`` (floored at 0); None if not numeric.

    It also bounds the work (in bits) sympy spends evaluating the node. Numbers: their log2.
    ``b^x``: ``2^{bound(x)} * bound(b)`` whatever the sign of x (``9^{-9^9}`` costs as much as
    ``9^{9^9}``). ``n!``: ``2^{bound(n)} * bound(n)``. ``binom(n, k)``: ``2^{bound(n)}``.
    ``exp(x)``: ``2^{bound(x)} * log2(e)``. Products add, sums take the max + 1, other functions
    the max of their arguments. Raises OverflowError as soon as a bound passes ``max_bits``, so
    towers stop before any huge float appears.
    """
    import sympy

    if isinstance(e, sympy.Rational):  # Integer included
        p, q = abs(int(e.p)), abs(int(e.q))
        return max(0.0, (math.log2(p) if p else 0.0) - math.log2(q))
    if isinstance(e, sympy.Float):
        _, man, exp, bc = e._mpf_[:4]
        return float(max(0, exp + bc)) if man else 0.0
    if isinstance(e, sympy.NumberSymbol) or e is sympy.I:
        return 2.0
    if isinstance(e, sympy.MatrixBase):
        for x in e:
            _log2_bound(x, max_bits)
        return None
    args = getattr(e, "args", ())
    if not isinstance(args, tuple):
        return None
    bounds = [_log2_bound(a, max_bits) for a in args]
    if not args or any(b is None for b in bounds):
        return None  # symbolic (or a leaf we do not know): nothing is computed with it

    def two_to(x: float) -> float:
        if x > 62:
            raise OverflowError
        return 2.0**x

    if isinstance(e, sympy.Pow):
        bits = two_to(bounds[1]) * bounds[0]
    elif isinstance(e, sympy.factorial):
        bits = two_to(bounds[0]) * bounds[0]
    elif isinstance(e, sympy.binomial):
        bits = two_to(bounds[0])
    elif isinstance(e, sympy.exp):
        bits = two_to(bounds[0]) * math.log2(math.e)
    elif isinstance(e, sympy.Mul):
        bits = sum(bounds)
    elif isinstance(e, sympy.Add):
        bits = max(bounds) + 1.0
    else:
        bits = max(bounds)
    if bits > max_bits:
        raise OverflowError
    return bits


def too_large(expr: Any, max_bits: int) -> bool:
    """True if evaluating some numeric part of ``expr`` needs more than ``max_bits`` bits.

    ``max_bits <= 0`` disables the guard. Unknown structures deeper than the recursion limit count
    as too large (their evaluation would be as risky).
    """
    if max_bits <= 0:
        return False
    try:
        _log2_bound(expr, float(max_bits))
    except (OverflowError, RecursionError):
        return True
    return False


# --------------------------------------------------------------------------------------------------
# Parse and compare
# --------------------------------------------------------------------------------------------------


def parse_math(text: str, *, max_number_bits: int) -> tuple[list, bool]:
    """math-verify's parse of ``\\boxed{text}`` -> ``(parsed, dropped)``.

    ``parsed`` holds a sympy object and/or the normalised string (math-verify's fallback); sympy
    objects that fail :func:`too_large` are dropped (``dropped=True``) so that only the text is
    compared. Call it under :func:`answer_timeout`: parsing can be slow on pathological input.
    """
    import math_verify
    import sympy

    parsed = math_verify.parse("\\boxed{" + text + "}", parsing_timeout=None)
    kept = [
        p
        for p in parsed
        if not (isinstance(p, (sympy.Basic, sympy.MatrixBase)) and too_large(p, max_number_bits))
    ]
    return kept, len(kept) != len(parsed)


def is_equivalent(gold: list, pred: list) -> bool:
    """math-verify's ``verify(gold, pred)`` (asymmetric: gold first), its own timeouts off."""
    import math_verify

    if not gold or not pred:
        return False
    return bool(math_verify.verify(gold, pred, timeout_seconds=None))


def warm_up() -> None:
    """Compile math-verify's lazy regexes and fill sympy caches (the first calls cost ~50-90 ms)."""
    quiet_math_verify()
    for gold, pred in (
        ("\\frac{1}{2}", "0.5"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("[1,3)", "[1,3)"),
        ("\\{1,2\\}", "\\{2,1\\}"),
        ("x=3", "3"),
        ("50\\%", "0.5"),
        ("\\text{Monday}", "Monday"),
        ("(1,2)", "(2,1)"),
        ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
        ("x^2+1", "1+x^2"),
        ("90^\\circ", "90"),
        ("1,000", "1000"),
        ("\\pi", "3.14159"),
    ):
        g, _ = parse_math(gold, max_number_bits=1 << 20)
        p, _ = parse_math(pred, max_number_bits=1 << 20)
        is_equivalent(g, p)
