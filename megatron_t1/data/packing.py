"""Sequence packing for SFT: documents into fixed-length rows, and rows into micro-batches.

Several tokenised documents share one row of ``seq_len`` tokens. Inside a row, document ``d``
occupies a contiguous slice; its positions restart at 0 and its tokens may attend only to earlier
tokens of the same document. Two layouts say so to the attention (``layout``):

- ``"thd"`` (default): the B rows of a micro-batch are laid end to end as one packed sequence
  ``[1, B*S]`` described by ``cu_seqlens`` (int32 offsets of every document, tail padding included,
  Megatron's ``PackedSeqParams``) and ``max_seqlen``: TransformerEngine's and flash-attention's varlen
  kernels and our SDPA core attention (one causal block per document) read it. Memory: a few bytes
  per token, never an [S, S] tensor.
- ``"mask"``: ``[B, S]`` rows with the dense ``[B, 1, S, S]`` boolean block-diagonal causal mask
  (Megatron's convention, True = masked out; :func:`block_diagonal_causal_mask`). B*S*S bytes: 300 MB
  for one 17,408-token row. Only Megatron's own unfused ``DotProductAttention`` needs it.

Placement is best-fit in input order (each document goes to the open row with the least room that
still fits it; a new row if none does): deterministic, close to optimal for short documents, and
it keeps the caller's shuffling. Documents longer than ``seq_len`` are **truncated** to their first
``seq_len`` tokens (not split: a split conversation would train an answer without its prompt);
the count is reported in one warning.

Tail padding forms its own segment (causal over itself, positions 0..), never a target: no query
row of the mask is fully masked, so a softmax over it never yields NaN.
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class PackedSeq:
    """One packed row; every field has length ``seq_len`` (S).

    Attributes:
        tokens: input token ids.
        labels: ``labels[t]`` = ``tokens[t+1]`` where that next token is a trained token of the same
            document, else ``IGNORE_INDEX`` (-100).
        loss_mask: 1 where ``labels[t] != IGNORE_INDEX``, else 0.
        position_ids: 0, 1, ... restarting at every document (and for the tail padding).
        segment_ids: document index within the row (0, 1, ...); tail padding gets ``n_docs``.
        n_docs: number of documents in the row (padding not counted).
    """

    tokens: list[int]
    labels: list[int]
    loss_mask: list[int]
    position_ids: list[int]
    segment_ids: list[int]
    n_docs: int


def _as_pair(ex) -> tuple[list[int], list[int]]:
    if isinstance(ex, dict):
        return list(ex["input_ids"]), list(ex["loss_mask"])
    ids, mask = ex
    return list(ids), list(mask)


def _build_row(docs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> PackedSeq:
    tokens, labels, position_ids, segment_ids = [], [], [], []
    for d, (ids, mask) in enumerate(docs):
        n = len(ids)
        tokens += ids
        # Next-token targets inside the document; the last token has no target in this document.
        labels += [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(n - 1)] + [IGNORE_INDEX]
        position_ids += range(n)
        segment_ids += [d] * n
    n_pad = seq_len - len(tokens)
    tokens += [pad_id] * n_pad
    labels += [IGNORE_INDEX] * n_pad
    position_ids += range(n_pad)
    segment_ids += [len(docs)] * n_pad
    loss_mask = [int(lab != IGNORE_INDEX) for lab in labels]
    return PackedSeq(tokens, labels, loss_mask, position_ids, segment_ids, len(docs))


def pack_sequences(examples: Sequence, seq_len: int, pad_id: int) -> list[PackedSeq]:
    """Pack tokenised documents into rows of exactly ``seq_len`` tokens (best-fit, input order).

    Args:
        examples: documents, each ``(input_ids, loss_mask)`` (e.g. a
            :class:`~megatron_t1.data.sft.TokenizedExample`) or a dict with those keys; ``loss_mask[t]``
            is 1 where token t is a training target.
        seq_len: row length S (the context length).
        pad_id: token id used for the tail padding.

    Returns:
        Rows in creation order; every input token appears exactly once (after truncation of
        documents longer than ``seq_len``, which is warned about with a count). Empty documents
        are dropped.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: need >= 2")
    rows: list[list[tuple[list[int], list[int]]]] = []
    room: list[int] = []
    # Sorted (remaining_room, row_index) of rows that are not full: best fit = first entry with
    # remaining_room >= n. Index ties are broken by creation order, which keeps this deterministic.
    open_rows: list[tuple[int, int]] = []
    n_truncated = 0
    for ex in examples:
        ids, mask = _as_pair(ex)
        if len(ids) != len(mask):
            raise ValueError(f"input_ids ({len(ids)}) and loss_mask ({len(mask)}) lengths differ")
        if not ids:
            continue
        if len(ids) > seq_len:
            n_truncated += 1
            ids, mask = ids[:seq_len], mask[:seq_len]
        n = len(ids)
        j = bisect.bisect_left(open_rows, (n, -1))
        if j < len(open_rows):
            _, r = open_rows.pop(j)
        else:
            r = len(rows)
            rows.append([])
            room.append(seq_len)
        rows[r].append((ids, mask))
        room[r] -= n
        if room[r] > 0:
            bisect.insort(open_rows, (room[r], r))
    if n_truncated:
        warnings.warn(
            f"pack_sequences: {n_truncated} documents longer than {seq_len} tokens truncated", stacklevel=2
        )
    return [_build_row(docs, seq_len, pad_id) for docs in rows]


def block_diagonal_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Attention mask of packed rows, Megatron convention (True = masked out).

    Args:
        segment_ids: ``[B, S]`` integer document index of every token.

    Returns:
        ``[B, 1, S, S]`` bool; ``mask[b, 0, i, j]`` is False iff ``segment_ids[b, j] ==
        segment_ids[b, i]`` and ``j <= i`` (query i may attend key j). Memory B*S*S bytes.
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [B, S], got {tuple(segment_ids.shape)}")
    s = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril_()
    return ~(same & causal).unsqueeze(1)


LAYOUTS = ("thd", "mask")


def cu_seqlens_from_segments(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens, max_seqlen)`` of rows laid end to end, from their ``[B, S]`` segment ids.

    A segment is a run of equal ids inside a row (a row's end always closes one), so document and
    tail-padding boundaries both become offsets. ``cu_seqlens`` is int32 ``[n_segments + 1]``, from 0
    to B*S; ``max_seqlen`` the longest segment (a Python int, as TransformerEngine wants it).
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [B, S], got {tuple(segment_ids.shape)}")
    b, s = segment_ids.shape
    starts = torch.ones(b, s, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    offsets = torch.nonzero(starts.reshape(-1)).squeeze(-1)
    cu = torch.cat([offsets, torch.tensor([b * s])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def attach_layout(batch: dict, segment_ids: torch.Tensor, layout: str) -> dict:
    """Describe the documents of ``batch`` (its ``[B, S]`` tensors, documents given by ``segment_ids``)
    in ``layout``, in place: ``"mask"`` adds ``attention_mask``; ``"thd"`` views every ``[B, S]``
    tensor as ``[1, B*S]`` and adds ``cu_seqlens`` and ``max_seqlen``. Returns ``batch``."""
    if layout == "mask":
        batch["attention_mask"] = block_diagonal_causal_mask(segment_ids)
        return batch
    rows = segment_ids.shape
    for k, v in list(batch.items()):
        if torch.is_tensor(v) and v.shape == rows:
            batch[k] = v.reshape(1, -1)
    batch["cu_seqlens"], batch["max_seqlen"] = cu_seqlens_from_segments(segment_ids)
    return batch


def schedule_shape(layout: str, seq_length: int, micro_batch_size: int) -> tuple[int, int]:
    """(sequence length, micro-batch size) Megatron's schedule sees for a micro-batch of ``layout``:
    THD lays the rows end to end, so [1, B*S]."""
    check_layout(layout)
    return (seq_length * micro_batch_size, 1) if layout == "thd" else (seq_length, micro_batch_size)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"packed layout {layout!r}: expected one of {LAYOUTS}")


def collate_packed(
    rows: Sequence[PackedSeq], *, ignore_index: int = IGNORE_INDEX, layout: str = "thd"
) -> dict:
    """Stack rows into a micro-batch of tensors.

    Args:
        rows: B packed rows of equal length S.
        ignore_index: the label written where ``loss_mask`` is 0. Keep -100 for
            ``torch.nn.functional.cross_entropy``; pass a valid id (e.g. the pad id) for Megatron's
            vocab-parallel cross entropy, which indexes every label and relies on ``loss_mask``.
        layout: ``"thd"`` or ``"mask"`` (module docstring).

    Returns:
        ``tokens``, ``labels``, ``position_ids``, ``segment_ids``: int64; ``loss_mask``: float32; all
        ``[B, S]`` (``"mask"``) or ``[1, B*S]`` (``"thd"``). ``"thd"`` adds ``cu_seqlens`` (int32) and
        ``max_seqlen`` (int), ``"mask"`` adds ``attention_mask`` ``[B, 1, S, S]`` bool (True = masked).
        The token-mean SFT loss of the batch is ``sum(ce * loss_mask) / loss_mask.sum()``; with
        several micro-batches, divide by the global count of trained tokens instead.
    """
    check_layout(layout)
    if not rows:
        raise ValueError("collate_packed: no rows")
    labels = torch.tensor([r.labels for r in rows], dtype=torch.long)
    if ignore_index != IGNORE_INDEX:
        labels = labels.masked_fill(labels == IGNORE_INDEX, ignore_index)
    batch = {
        "tokens": torch.tensor([r.tokens for r in rows], dtype=torch.long),
        "labels": labels,
        "loss_mask": torch.tensor([r.loss_mask for r in rows], dtype=torch.float32),
        "position_ids": torch.tensor([r.position_ids for r in rows], dtype=torch.long),
        "segment_ids": torch.tensor([r.segment_ids for r in rows], dtype=torch.long),
    }
    return attach_layout(batch, batch["segment_ids"], layout)


def micro_batches(
    rows: Sequence[PackedSeq], micro_batch_size: int, *, drop_last: bool = False, **collate_kw
) -> Iterator[dict]:
    """Yield :func:`collate_packed` batches of ``micro_batch_size`` consecutive rows.

    The last, smaller batch is yielded unless ``drop_last``. ``collate_kw`` goes to
    :func:`collate_packed`.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size}: need >= 1")
    for i in range(0, len(rows), micro_batch_size):
        chunk = rows[i : i + micro_batch_size]
        if len(chunk) < micro_batch_size and drop_last:
            return
        yield collate_packed(chunk, **collate_kw)
