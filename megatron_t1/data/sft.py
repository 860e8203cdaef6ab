"""SFT data: chat-template formatting with prompt tokens masked out of the loss.

T1's SFT stage (arXiv 2501.11651, Sec. 3.1) is plain next-token training on the response tokens
only. A record is a chat ``messages`` list (the layout of the released T1 SFT set)::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

Only assistant turns are trained: their content and the end-of-turn text the chat template
renders after it (``<|im_end|>`` for ChatML / Qwen2.5), without trailing whitespace. Everything
else (system, user, the ``<|im_start|>assistant\\n`` header) has loss mask 0.

Extension used by the answer-from-truncated-thinking examples: an assistant message may carry
``"mask_prefix_chars": n``; its first ``n`` characters are context, not targets.

How spans are found, for any chat template: render ``messages[:i]`` with the generation prompt
and ``messages[:i+1]`` without; the assistant span is the difference. Then the whole conversation
is tokenised once with offsets and a token is trained iff its first character lies in a span.
This needs a prefix-stable template (true for ChatML/Qwen2.5/Llama-3); otherwise a clear error.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import NamedTuple

from megatron_t1.data.io import DataError, read_records, require_field


class TokenizedExample(NamedTuple):
    """One tokenised conversation.

    Attributes:
        input_ids: token ids, length L.
        loss_mask: length L, 1 where the token is a training target (assistant text), else 0.
    """

    input_ids: list[int]
    loss_mask: list[int]


def _validate_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for j, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError(f"message {j} must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to train on")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    # Only role/content go to the template: extra keys (mask_prefix_chars) are ours.
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and return ``(text, [(start, end), ...])``, the trained char spans.

    Raises ValueError if the chat template is not prefix-stable (a rendered prefix of the
    conversation is not a prefix of the whole), since the spans would then be wrong.
    """
    _validate_messages(messages)
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("an assistant message comes first: no prompt to condition on")
        head = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (text.startswith(upto) and upto.startswith(head)):
            raise ValueError("the chat template is not prefix-stable; cannot locate assistant tokens")
        skip = m.get("mask_prefix_chars") or 0
        if not 0 <= skip <= len(m["content"]):
            raise ValueError(f"mask_prefix_chars={skip} outside [0, {len(m['content'])}]")
        start, end = len(head) + skip, len(upto.rstrip())
        if start < end:
            spans.append((start, end))
    return text, spans


def tokenize_chat(example: dict, tokenizer, max_len: int | None = None) -> TokenizedExample:
    """Tokenise ``example["messages"]`` with the chat template; mask all but assistant tokens.

    Args:
        example: a dict with ``"messages"`` (list of ``{"role", "content"}``; assistant messages may
            carry ``"mask_prefix_chars"``).
        tokenizer: a fast HF tokenizer with a chat template (offsets are needed).
        max_len: if given, keep the first ``max_len`` tokens (right truncation).

    Returns:
        ``TokenizedExample(input_ids, loss_mask)``, both of length L <= max_len; the assistant
        turn's end-of-turn token (``<|im_end|>``) has loss mask 1.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenize_chat needs a fast tokenizer (offset mapping)")
    text, spans = assistant_char_spans(example["messages"], tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [0] * len(ids)
    k = 0  # spans and offsets are both increasing: one merge pass
    for t, (s, _e) in enumerate(enc["offset_mapping"]):
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        if k < len(spans) and spans[k][0] <= s < spans[k][1]:
            mask[t] = 1
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return TokenizedExample(ids, mask)


class SFTDataset:
    """Tokenised SFT examples from a jsonl / json / parquet file of chat ``messages`` records.

    Iterating yields :class:`TokenizedExample` in file order. A malformed line or record raises
    :class:`~megatron_t1.data.io.DataError` with ``path:line: reason``. Examples longer than
    ``max_len`` are right-truncated; examples left with no trained token are skipped; both are
    counted (``n_truncated``, ``n_skipped`` after a full pass) and reported in one warning.
    """

    def __init__(self, path: str | os.PathLike, tokenizer, max_len: int, messages_field: str = "messages"):
        self.path = os.fspath(path)
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.messages_field = messages_field
        self.n_truncated = 0
        self.n_skipped = 0

    def __iter__(self) -> Iterator[TokenizedExample]:
        n_trunc = n_skip = 0
        for line_no, rec in read_records(self.path):
            messages = require_field(self.path, line_no, rec, self.messages_field, list)
            try:
                ex = tokenize_chat({"messages": messages}, self.tokenizer, None)
            except (ValueError, TypeError, KeyError) as e:
                raise DataError(f"{self.path}:{line_no}: bad {self.messages_field!r}: {e}") from None
            if len(ex.input_ids) > self.max_len:
                n_trunc += 1
                ex = TokenizedExample(ex.input_ids[: self.max_len], ex.loss_mask[: self.max_len])
            if not any(ex.loss_mask):
                n_skip += 1
                continue
            yield ex
        self.n_truncated, self.n_skipped = n_trunc, n_skip
        if n_trunc or n_skip:
            warnings.warn(
                f"{self.path}: {n_trunc} examples truncated to {self.max_len} tokens, "
                f"{n_skip} skipped (no assistant token left)",
                stacklevel=2,
            )

    def load(self) -> list[TokenizedExample]:
        """All examples as a list (the demo sets are small)."""
        return list(self)
