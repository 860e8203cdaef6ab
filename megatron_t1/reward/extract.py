"""Final-answer extraction from a model response: pure string work, no sympy, linear time.

Order of preference (T1 outputs end with a summary that boxes the answer):

1. Split the thinking from the summary at the last ``</think>`` (:func:`split_thinking`).
2. In the summary: the content of the **last** ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces,
   ``\\boxed {x}``, ``\\boxed x``). A last box that never closes is malformed: no answer, rather
   than an earlier box the model may have retracted.
3. Otherwise the last "final answer is ...", "answer: ...", "**Final Answer**" phrase.
4. Multiple choice (the reference is a letter, GPQA-style): a boxed letter, "answer: C",
   "the answer is (C)", or a last line that is only "(C)".

The extracted string goes to math-verify (:mod:`megatron_t1.reward.math_answer`) for equivalence.
"""

from __future__ import annotations

import re

__all__ = [
    "extract_answer",
    "extract_choice",
    "final_answer_phrase",
    "gold_choice",
    "last_boxed",
    "split_thinking",
]

THINK_OPEN = "<think>"
_BOX_CMD = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# A bare TeX argument after ``\boxed`` without braces: ``\boxed 5``, ``\boxed -3.5``.
_BARE_ARG = re.compile(r"[^\s$\\{}]+")
# "final answer is", "Final Answer:", "**Final Answer**" heading on its own line, "the answer is",
# "Answer:". A bare "answer" followed by a newline is too common in prose to be an anchor.
_PHRASE = re.compile(
    r"(?i:final\s+answer)(?:\s*\*\*)?(?:\s+is\b|\s*[:=]|[ \t]*\n)"
    r"|(?i:\banswer)(?:\s*\*\*)?(?:\s+is\b|\s*:)"
)
_DELIMS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
# A sentence-ending period: not a decimal point (digit on both sides) and followed by space/end.
_SENTENCE_END = re.compile(r"(?<!\d)\.(?=\s|$)|\.(?=\s+[A-Z])|\.$")
_LETTERS = "ABCDEFGHIJ"
_GOLD_CHOICE = re.compile(rf"^\s*\(?\s*([{_LETTERS}])\s*\)?\s*$")
_BOXED_CHOICE = re.compile(
    rf"^\s*(?:\\text(?:bf|rm)?\s*\{{)?\s*(?:\(\s*([{_LETTERS}])\s*\)|([{_LETTERS}]))\s*\)?\s*\}}?\s*\.?\s*$"
)
_ANSWER_CHOICE = re.compile(
    rf"(?i:answer)(?:\s*\*\*)?\s*(?i:is|:)?[\s*:$]*(?i:option|choice)?[\s*:$]*"
    rf"\(?\s*([{_LETTERS}])\s*\)?(?![A-Za-z0-9])"
)
_LAST_LINE_CHOICE = re.compile(rf"^[\s*$]*\(\s*([{_LETTERS}])\s*\)[\s*.$]*$|^[\s*]*([{_LETTERS}])[\s*.]*$")


def split_thinking(text: str, end_marker: str = "</think>") -> tuple[str, str]:
    """Split a response into ``(thinking, summary)`` at the last ``end_marker``.

    Without the marker, a response that opens ``<think>`` has no summary yet (``(text, "")``)
    and any other response is all summary (``("", text)``). An empty marker disables the split.
    """
    if end_marker:
        cut = text.rfind(end_marker)
        if cut >= 0:
            return text[:cut], text[cut + len(end_marker) :]
        if text.lstrip().startswith(THINK_OPEN):
            return text, ""
    return "", text


def _braced(text: str, start: int) -> str | None:
    """Content of the ``{...}`` group opening at ``text[start]``, honouring nesting and ``\\{``."""
    depth = 0
    i = start
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # an escaped character (\{ \} \\) never opens or closes a group
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``; None if absent or malformed.

    ``\\boxed{\\boxed{3}}`` gives ``3`` (the innermost box is the last one to start).
    """
    last = None
    for last in _BOX_CMD.finditer(text):  # noqa: B007 - we want the last match
        pass
    if last is None:
        return None
    i = last.end()
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        content = _braced(text, i)
        if content is None:
            return None
    else:
        bare = _BARE_ARG.match(text, i)
        if bare is None:
            return None
        content = bare.group(0).rstrip(".,;:")
    content = content.strip()
    return content or None


def _clean_phrase(rest: str) -> str | None:
    """Cut the answer out of the text after "final answer is": one line, delimiters, final period."""
    rest = rest.lstrip(" \t*:")
    for open_, close in _DELIMS:
        if rest.startswith(open_):
            end = rest.find(close, len(open_))
            if end > len(open_):
                return rest[len(open_) : end].strip() or None
            break
    line = rest.split("\n", 1)[0]
    end = _SENTENCE_END.search(line)
    if end is not None:
        line = line[: end.start()]
    line = line.strip().strip("*").strip().rstrip(".,;:").strip()
    for open_, close in _DELIMS:  # "$\frac12$." after the period was cut
        if line.startswith(open_) and line.endswith(close) and len(line) > len(open_) + len(close):
            line = line[len(open_) : -len(close)].strip()
            break
    return line or None


def final_answer_phrase(text: str) -> str | None:
    """The answer after the last "final answer is" / "answer:" / "**Final Answer**" phrase, else None."""
    last = None
    for last in _PHRASE.finditer(text):  # noqa: B007 - we want the last match
        pass
    if last is None:
        return None
    # a heading on its own line ("**Final Answer**\n\n$5$") continues on the next non-empty line
    return _clean_phrase(text[last.end() :].lstrip("\n \t*"))


def gold_choice(gold: str) -> str | None:
    """The letter of a multiple-choice reference (``"C"``, ``"(C)"``), else None (a math answer)."""
    m = _GOLD_CHOICE.match(gold)
    return m.group(1) if m else None


def extract_choice(text: str) -> str | None:
    """A multiple-choice letter: boxed, "answer: C" / "the answer is (C)", or a last line "(C)"."""
    boxed = last_boxed(text)
    if boxed is not None:
        m = _BOXED_CHOICE.match(boxed)
        return (m.group(1) or m.group(2)) if m else None
    last = None
    for last in _ANSWER_CHOICE.finditer(text):  # noqa: B007 - we want the last match
        pass
    if last is not None:
        return last.group(1)
    lines = [ln for ln in text.rstrip().rsplit("\n", 3) if ln.strip()]
    if lines:
        m = _LAST_LINE_CHOICE.match(lines[-1])
        if m:
            return m.group(1) or m.group(2)
    return None


def extract_answer(
    response: str,
    *,
    choice: bool = False,
    thinking_end: str = "</think>",
    answer_from_thinking: bool = False,
) -> str | None:
    """The final answer of ``response`` as a string (a letter when ``choice``), or None.

    Reads the summary (after ``thinking_end``); falls back to the thinking only when
    ``answer_from_thinking``. Math answers: last box, else the last final-answer phrase.
    """
    thinking, summary = split_thinking(response, thinking_end)
    regions = [summary] + ([thinking] if answer_from_thinking and thinking else [])
    for region in regions:
        if choice:
            found = extract_choice(region)
        else:
            # the last box wins; a malformed last box is "no answer" even if a phrase follows it
            found = last_boxed(region) if _BOX_CMD.search(region) else final_answer_phrase(region)
        if found is not None:
            return found
    return None
