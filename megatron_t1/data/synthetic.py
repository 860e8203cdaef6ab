"""The CPU demo task: multi-operand integer arithmetic with a ``\\boxed{}`` final answer.

A problem is a chain ``a_1 op_1 a_2 op_2 ... a_k`` with ``op in {+, -}`` evaluated left to right
(``n_operands`` operands of ``digits`` decimal digits; no negative intermediate results). Its SFT
trace follows T1's trial-and-error style (arXiv 2501.11651, Sec. 3.1: attempts, some wrong, each
critiqued, reflected on and retried), one line per operation::

    <think>
    8 + 7 = 14
    check: 14 - 7 = 7, not 8, wrong
    The check fails, so 8 + 7 is not 14. Let me redo it.
    8 + 7 = 15
    check: 15 - 7 = 8, correct
    now: 15 - 9 + 4
    15 - 9 = 6
    check: 6 + 9 = 15, correct
    now: 6 + 4
    6 + 4 = 10
    check: 10 - 4 = 6, correct
    </think>
    The answer is \\boxed{10}.

The ``now:`` lines (``restate=True``) restate the remaining expression so that the next step's
operands sit side by side instead of being looked up by position in the question.

Defaults (3-5 single-digit operands, 25% wrong attempts) are calibrated so that the demo's ~1M-
parameter policy after ~4 CPU minutes of Megatron SFT is right on 59% of the held-out problems with
greedy decoding and on 30% when sampling at temperature 1 (bench/RESULTS.md). With 3-6 operands
(the first default) the same budget gave 29-46% greedy depending on run-to-run noise, too close
to the demo's 30% floor.
Multi-digit operands are out of reach for such a budget (bench/RESULTS.md, "SFT calibration").

Every ``check:`` line is arithmetically true (it applies the inverse operation to the written
result and compares with the operand it must give back): "correct" exactly when the attempt was
right. Wrong attempts are plausible slips (one digit off by one, i.e. a missed or spurious carry).

Answer-from-truncated-thinking examples teach the summarising pass of the inference-scaling sweep
(T1 Sec. 4): the thinking is cut at a random character, closed with :func:`close_thinking`, and
the model writes only the final answer line. The truncated thinking is context, not a target:
the assistant message carries ``"mask_prefix_chars"`` (see :mod:`megatron_t1.data.sft`), otherwise
the model would learn to stop thinking at random points.

The demo's prompt template (``DEMO_PROMPT_TEMPLATE``, :func:`prompt_messages`) is shared by its SFT
data, RL and evaluation; the demo's configs set it as ``data.prompt_template``. Problems are
split into train / held-out by a stable hash of the question, so the two sets are disjoint for
every seed. Everything is deterministic given the seed; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from megatron_t1.data import template as _template

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DEMO_PROMPT_TEMPLATE = "{question}\n" + BOXED_INSTRUCTION
"""The demo task's user message: the question, a newline, the boxed instruction. It is the same text as
the generic default (:data:`megatron_t1.data.template.DEFAULT_PROMPT_TEMPLATE`) but the demo's own
choice: a change of the default must not change the demo's SFT data or its numbers."""
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# A stable 1-in-HELDOUT_MODULUS share of the problem space is held out (by hash of the question).
HELDOUT_MODULUS = 10
_OPS = ("+", "-")
_REFLECTIONS = (
    "The check fails, so {a} {op} {b} is not {w}. Let me redo it.",
    "That is wrong: I made a mistake in {a} {op} {b}. Try again.",
)


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem.

    Attributes:
        question: the problem text, e.g. ``"Compute 47 + 385 - 129."``.
        answer: the reference answer as a canonical integer string, e.g. ``"303"``.
        operands: the integers ``a_1..a_k``.
        ops: the ``k - 1`` operators, each ``"+"`` or ``"-"``.
    """

    question: str
    answer: str
    operands: tuple[int, ...]
    ops: tuple[str, ...]


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def _check_line(a: int, op: str, b: int, written: int) -> tuple[str, bool]:
    """Verify ``a op b = written`` by the inverse operation; returns (line, is_correct)."""
    back = written - b if op == "+" else written + b
    inv = "-" if op == "+" else "+"
    if back == a:
        return f"check: {written} {inv} {b} = {back}, correct", True
    return f"check: {written} {inv} {b} = {back}, not {a}, wrong", False


def _slip(rng: random.Random, true: int) -> int:
    """A plausible wrong result: one digit of ``true`` off by one (missed / spurious carry)."""
    n_digits = len(str(abs(true)))
    for _ in range(20):
        wrong = true + rng.choice((-1, 1)) * 10 ** rng.randrange(n_digits)
        if wrong != true and (wrong >= 0) == (true >= 0):  # a slip does not flip the sign
            return wrong
    return true + 1


def _question(operands: tuple[int, ...], ops: tuple[str, ...]) -> str:
    expr = str(operands[0]) + "".join(f" {op} {b}" for op, b in zip(ops, operands[1:]))
    return f"Compute {expr}."


def _check_range(name: str, lo_hi: tuple[int, int], minimum: int) -> None:
    lo, hi = lo_hi
    if not minimum <= lo <= hi:
        raise ValueError(f"{name}={lo_hi!r}: need {minimum} <= min <= max")


def make_problem(
    rng: random.Random,
    *,
    n_operands: tuple[int, int] = (3, 5),
    digits: tuple[int, int] = (1, 1),
    allow_negative: bool = False,
) -> Problem:
    """Draw one problem.

    Args:
        rng: the random source (``random.Random``); the only state used.
        n_operands: inclusive range of the number of operands ``k`` (>= 2).
        digits: inclusive range of the number of decimal digits per operand (>= 1); each operand
            draws its digit count uniformly, then a value uniformly among numbers of that length.
        allow_negative: if False, redraw until every intermediate result is >= 0 (keeps traces free
            of minus signs, which a tiny model finds hard).
    """
    _check_range("n_operands", n_operands, 2)
    _check_range("digits", digits, 1)
    while True:
        k = rng.randint(*n_operands)
        operands = []
        for _ in range(k):
            d = rng.randint(*digits)
            operands.append(rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1))
        ops = tuple(rng.choice(_OPS) for _ in range(k - 1))
        value, ok = operands[0], True
        for op, b in zip(ops, operands[1:]):
            value = _apply(value, op, b)
            ok = ok and value >= 0
        if ok or allow_negative:
            return Problem(_question(tuple(operands), ops), str(value), tuple(operands), ops)


def is_heldout(question: str) -> bool:
    """Stable split: a question is held out iff its SHA-256 is 0 modulo ``HELDOUT_MODULUS``."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % HELDOUT_MODULUS == 0


def make_problems(n: int, seed: int, split: str = "train", **difficulty) -> list[Problem]:
    """``n`` distinct problems of one split, deterministic in ``(n, seed, split, difficulty)``.

    ``train`` and ``heldout`` are disjoint for any seeds (hash split, :func:`is_heldout`).
    ``difficulty`` is forwarded to :func:`make_problem`. Raises ValueError if the problem space
    is too small for ``n`` distinct problems.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}: expected 'train' or 'heldout'")
    want_heldout = split == "heldout"
    rng = random.Random(f"{seed}:{split}")
    seen: set[str] = set()
    out: list[Problem] = []
    budget = 200 * n + 10_000
    while len(out) < n:
        budget -= 1
        if budget < 0:
            raise ValueError(
                f"could not draw {n} distinct {split} problems with {difficulty}: space too small"
            )
        p = make_problem(rng, **difficulty)
        if is_heldout(p.question) == want_heldout and p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def prompt_messages(question: str, system: str | None = None) -> list[dict[str, str]]:
    """The demo's prompt (its SFT data, RL and evaluation): :data:`DEMO_PROMPT_TEMPLATE` as a chat
    ``messages`` list (an optional system message, then the user message)."""
    return _template.prompt_messages(question, template=DEMO_PROMPT_TEMPLATE, system=system)


def answer_line(answer: str) -> str:
    """The text after the thinking: ``The answer is \\boxed{answer}.``"""
    return f"The answer is \\boxed{{{answer}}}."


def close_thinking(partial: str) -> str:
    """Close a (possibly truncated) thinking that starts with ``<think>``: add ``\\n</think>\\n``.

    The inference-scaling sweep appends exactly this to the thinking truncated at N tokens, then
    lets the model write :func:`answer_line`; the truncated SFT examples are built the same way.
    """
    return partial + ("" if partial.endswith("\n") else "\n") + THINK_CLOSE + "\n"


def trace_lines(
    problem: Problem,
    rng: random.Random,
    *,
    error_rate: float = 0.25,
    max_attempts: int = 3,
    restate: bool = True,
) -> list[str]:
    """The thinking lines of a trial-and-error, self-verifying solution (no ``<think>`` tags).

    Each operation is attempted; an attempt is wrong with probability ``error_rate`` (the last of
    ``max_attempts`` is always right), checked by the inverse operation, and a failed check is
    followed by a reflection and a retry. With ``restate``, each verified step is followed by
    ``now: <result> <remaining expression>`` so that the next step's operands sit side by side.
    """
    lines: list[str] = []
    value = problem.operands[0]
    rest = list(zip(problem.ops, problem.operands[1:]))
    for i, (op, b) in enumerate(rest):
        true = _apply(value, op, b)
        for attempt in range(max_attempts):
            wrong = attempt < max_attempts - 1 and rng.random() < error_rate
            written = _slip(rng, true) if wrong else true
            lines.append(f"{value} {op} {b} = {written}")
            check, ok = _check_line(value, op, b, written)
            lines.append(check)
            if ok:
                break
            lines.append(rng.choice(_REFLECTIONS).format(a=value, op=op, b=b, w=written))
        value = true
        if restate and i + 1 < len(rest):
            lines.append("now: " + str(value) + "".join(f" {o} {x}" for o, x in rest[i + 1 :]))
    return lines


def full_response(problem: Problem, rng: random.Random, **trace_kw) -> str:
    """The assistant text: ``<think>`` + trace + ``</think>`` + :func:`answer_line`."""
    thinking = THINK_OPEN + "\n" + "\n".join(trace_lines(problem, rng, **trace_kw))
    return close_thinking(thinking) + answer_line(problem.answer)


def make_sft_examples(
    n: int,
    seed: int,
    *,
    truncated_fraction: float = 0.1,
    error_rate: float = 0.25,
    restate: bool = True,
    system: str | None = None,
    **difficulty,
) -> list[dict]:
    """``n`` SFT examples on train problems, in the released T1 SFT layout (``messages`` lists).

    Each dict: ``{"messages": [user prompt, assistant trace], "answer": str}``. A share
    ``truncated_fraction`` are answer-from-truncated-thinking examples: the assistant content is
    ``close_thinking(thinking[:cut]) + answer_line`` with a uniform random cut, and the message
    carries ``"mask_prefix_chars": len(close_thinking(...))`` so only the answer line is trained.
    Deterministic in all arguments; ``difficulty`` is forwarded to :func:`make_problem`.
    """
    if not 0.0 <= truncated_fraction <= 1.0:
        raise ValueError(f"truncated_fraction={truncated_fraction}: must be in [0, 1]")
    problems = make_problems(n, seed, "train", **difficulty)
    rng = random.Random(f"{seed}:sft")
    out = []
    for p in problems:
        response = full_response(p, rng, error_rate=error_rate, restate=restate)
        assistant: dict = {"role": "assistant", "content": response}
        if rng.random() < truncated_fraction:
            thinking = response[: response.index(THINK_CLOSE)].rstrip("\n")
            cut = rng.randrange(len(THINK_OPEN) + 1, len(thinking) + 1)
            prefix = close_thinking(thinking[:cut])
            assistant = {
                "role": "assistant",
                "content": prefix + answer_line(p.answer),
                "mask_prefix_chars": len(prefix),
            }
        out.append({"messages": prompt_messages(p.question, system) + [assistant], "answer": p.answer})
    return out


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (no nested braces: enough for this task), else None."""
    found = _BOXED.findall(text)
    return found[-1].strip() if found else None


def is_correct(response: str, answer: str) -> bool:
    """Exact-match score of a response: its last boxed content, as an integer, equals ``answer``."""
    got = last_boxed(response)
    if got is None:
        return False
    try:
        return int(got.replace(",", "")) == int(answer)
    except ValueError:
        return got == answer
