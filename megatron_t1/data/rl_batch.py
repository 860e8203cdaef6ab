"""RL responses -> packed, DP-balanced micro-batches (one plan per step, the same on every rank).

T1's responses range from tens to thousands of tokens, so one response per padded row wastes most
of a step on padding. Each response (prompt + sampled tokens, EOS included) is a document of
``len(prompt) + len(response)`` tokens; documents are packed into rows of ``seq_len`` tokens
(:mod:`megatron_t1.data.packing` conventions: positions restart per document, tail padding is its
own segment, never a target), in the THD layout (``cu_seqlens``; TransformerEngine's varlen attention
or our SDPA core attention) or, for Megatron's unfused attention only, with a dense block-diagonal
[S, S] mask.

Balance across data-parallel ranks (what a step waits for is its slowest rank):

1. documents are dealt longest first, each to the rank holding the fewest tokens so far (LPT; ties
   go to the rank with fewer documents, then the lower rank) -> tokens per rank within a few % of the
   mean once there are several documents per rank (``tests/unit/test_rl_batch.py``: <= 1.05 on a
   log-normal mix);
2. each rank packs its documents best-fit decreasing into rows;
3. every rank gets the same number of micro-batches (Megatron's schedule and the gradient all-reduce
   need it): ranks with fewer rows get all-padding rows (loss mask 0).

The plan depends only on the lengths, so every rank computes the same plan without communication.
"""

from __future__ import annotations

import bisect
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_t1.data.packing import attach_layout, check_layout


@dataclass
class RLPackPlan:
    """Which documents go where. ``rows[rank][r]`` lists document indices in row order."""

    rows: list[list[list[int]]]
    seq_len: int
    micro_batch_size: int
    doc_tokens: list[int]

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per rank (equal on every rank)."""
        return len(self.rows[0]) // self.micro_batch_size

    def tokens_per_rank(self) -> list[int]:
        return [sum(self.doc_tokens[d] for row in rank for d in row) for rank in self.rows]

    def stats(self) -> dict[str, float]:
        """``dp_token_imbalance`` (max / mean real tokens per rank) and ``pad_frac`` (share of padding)."""
        per_rank = self.tokens_per_rank()
        mean = sum(per_rank) / len(per_rank)
        slots = sum(len(rank) for rank in self.rows) * self.seq_len
        return {
            "dp_token_imbalance": max(per_rank) / mean if mean else 1.0,
            "pad_frac": 1.0 - sum(per_rank) / slots if slots else 0.0,
            "rows_per_rank": float(len(self.rows[0])),
        }


def plan_rl_packing(doc_tokens: Sequence[int], seq_len: int, dp: int, micro_batch_size: int) -> RLPackPlan:
    """Assign documents (token counts, each <= ``seq_len``) to DP ranks and rows (module docstring)."""
    if dp < 1 or micro_batch_size < 1:
        raise ValueError(f"dp={dp} and micro_batch_size={micro_batch_size} must be >= 1")
    for i, n in enumerate(doc_tokens):
        if not 0 < n <= seq_len:
            raise ValueError(f"document {i} has {n} tokens; each must be in [1, seq_len={seq_len}]")
    order = sorted(range(len(doc_tokens)), key=lambda i: (-doc_tokens[i], i))
    load = [(0, 0, r) for r in range(dp)]  # (tokens, docs, rank), kept sorted: load[0] is the lightest
    per_rank: list[list[int]] = [[] for _ in range(dp)]
    for i in order:
        tokens, docs, r = load.pop(0)
        per_rank[r].append(i)
        bisect.insort(load, (tokens + doc_tokens[i], docs + 1, r))
    rows: list[list[list[int]]] = []
    for docs in per_rank:  # already longest first: best-fit decreasing
        rank_rows: list[list[int]] = []
        room: list[tuple[int, int]] = []  # sorted (free tokens, row index)
        for i in docs:
            n = doc_tokens[i]
            j = bisect.bisect_left(room, (n, -1))
            if j < len(room):
                free, r = room.pop(j)
            else:
                free, r = seq_len, len(rank_rows)
                rank_rows.append([])
            rank_rows[r].append(i)
            if free - n > 0:
                bisect.insort(room, (free - n, r))
        rows.append(rank_rows)
    n_rows = max(1, max(len(r) for r in rows))
    n_rows = math.ceil(n_rows / micro_batch_size) * micro_batch_size
    for rank_rows in rows:
        rank_rows.extend([] for _ in range(n_rows - len(rank_rows)))  # all-padding rows
    return RLPackPlan(rows, seq_len, micro_batch_size, list(doc_tokens))


def rl_documents(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], seq_len: int
) -> tuple[list[list[int]], list[int], int]:
    """(token lists, prompt lengths, number truncated): prompt + response, cut to ``seq_len`` tokens."""
    docs, plens, cut = [], [], 0
    for p, c in zip(prompt_ids, response_ids):
        if len(p) >= seq_len:
            raise ValueError(f"a prompt of {len(p)} tokens leaves no room in data.seq_length={seq_len}")
        ids = list(p) + list(c)
        if len(ids) > seq_len:
            ids, cut = ids[:seq_len], cut + 1
        docs.append(ids)
        plens.append(len(p))
    if cut:
        warnings.warn(f"{cut} responses cut to data.seq_length={seq_len} tokens for training", stacklevel=2)
    return docs, plens, cut


def collate_rl_rank(
    plan: RLPackPlan,
    rank: int,
    docs: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
    pad_id: int,
    token_values: dict[str, Sequence[Sequence[float]]] | None = None,
    doc_index: Sequence[int] | None = None,
    layout: str = "thd",
    doc_routes: Sequence[torch.Tensor] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of DP rank ``rank``, on the CPU (move each to the device when it is used).

    Each micro-batch has ``tokens``, ``labels``, ``position_ids``, ``seq_ids`` (document index within
    the micro-batch), ``doc_ids`` (global document index at trained positions, -1 elsewhere): [b, S]
    int64; ``loss_mask`` [b, S] float (1 where the label is a response token, EOS included). With
    ``layout="thd"`` these are [1, b*S] (the rows end to end) and ``cu_seqlens`` (int32) and
    ``max_seqlen`` (int) describe the documents; with ``"mask"`` ``attention_mask`` [b, 1, S, S] bool
    (True = masked out) does. ``token_values[name][d][j]`` (a value per
    response token j of document d, e.g. the rollout engine's log-probs) lands at the position whose
    label is that token, as a float [b, S] tensor ``name`` (0 elsewhere). ``doc_index[d]`` is the id
    written to ``doc_ids`` for document d (default d), for a plan over a subset of a step's documents.
    ``doc_routes[d]`` (int ``[len(docs[d]), layers, k]``, the MoE experts the rollout engine routed each
    token to) fills ``routed_experts``: int16 ``[b, S, layers, k]`` (THD: ``[1, b*S, layers, k]``), -1
    at padding.
    """
    check_layout(layout)
    token_values = token_values or {}
    S, b = plan.seq_len, plan.micro_batch_size
    rows = plan.rows[rank]
    out = []
    for m in range(0, len(rows), b):
        tokens = torch.full((b, S), pad_id, dtype=torch.long)
        labels = torch.full((b, S), pad_id, dtype=torch.long)
        position_ids = torch.zeros(b, S, dtype=torch.long)
        segment_ids = torch.zeros(b, S, dtype=torch.long)
        seq_ids = torch.zeros(b, S, dtype=torch.long)
        doc_ids = torch.full((b, S), -1, dtype=torch.long)
        loss_mask = torch.zeros(b, S)
        values = {k: torch.zeros(b, S) for k in token_values}
        routes = None
        if doc_routes is not None:
            routes = torch.full((b, S, *doc_routes[0].shape[1:]), -1, dtype=torch.int16)
        local = 0
        for r, row in enumerate(rows[m : m + b]):
            o = 0
            for s_idx, d in enumerate(row):
                ids, n, p = docs[d], len(docs[d]), prompt_lens[d]
                tokens[r, o : o + n] = torch.as_tensor(ids)
                labels[r, o : o + n - 1] = torch.as_tensor(ids[1:])
                position_ids[r, o : o + n] = torch.arange(n)
                segment_ids[r, o : o + n] = s_idx
                seq_ids[r, o : o + n] = local
                t0, t1 = o + p - 1, o + n - 1  # positions whose labels are response tokens
                loss_mask[r, t0:t1] = 1.0
                doc_ids[r, t0:t1] = d if doc_index is None else doc_index[d]
                for k, v in token_values.items():
                    values[k][r, t0:t1] = torch.as_tensor(v[d][: t1 - t0], dtype=torch.float32)
                if routes is not None:
                    if doc_routes[d].shape[0] != n:
                        raise ValueError(f"document {d}: {n} tokens but routing for {doc_routes[d].shape[0]}")
                    routes[r, o : o + n] = doc_routes[d]
                o += n
                local += 1
            segment_ids[r, o:] = len(row)  # tail padding: its own causal segment
            position_ids[r, o:] = torch.arange(S - o)
        mb = {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": position_ids,
            "seq_ids": seq_ids,
            "doc_ids": doc_ids,
            **values,
        }
        attach_layout(mb, segment_ids, layout)
        if routes is not None:  # THD: the rows end to end, as attach_layout lays out the [b, S] tensors
            mb["routed_experts"] = routes.reshape(1, b * S, *routes.shape[2:]) if layout == "thd" else routes
        out.append(mb)
    return out


def minibatch_parts(num_docs: int, k: int, optim_steps: int) -> list[list[int]]:
    """Split a step's documents into ``min(optim_steps, groups)`` mini-batches of whole prompt groups.

    Documents come in groups of ``k`` (the kept responses of one prompt, consecutive): a group's
    leave-one-out baseline needs all of it in one optimizer step. Groups are dealt round robin, so
    mini-batch ``j`` holds groups ``j, j + n, j + 2n, ...``. ``optim_steps`` 1: one part, every document.
    """
    if k < 1 or optim_steps < 1 or num_docs % k:
        raise ValueError(f"{num_docs} documents do not form groups of k={k} (optim_steps={optim_steps})")
    n_groups = num_docs // k
    n_mini = min(optim_steps, n_groups)
    groups = [list(range(g * k, (g + 1) * k)) for g in range(n_groups)]
    return [sum(groups[j::n_mini], []) for j in range(n_mini)]


@dataclass
class StepBatches:
    """One RL step's training data on this DP rank: the documents, their split into mini-batches (one
    optimizer step each) and every mini-batch's packing plan and micro-batches (on the CPU)."""

    docs: list[list[int]]
    prompt_lens: list[int]
    parts: list[list[int]]
    """Document indices of each mini-batch."""
    microbatches: list[list[dict[str, torch.Tensor]]]
    """The micro-batches of each mini-batch (this rank's share)."""
    plans: list[RLPackPlan]

    @property
    def num_docs(self) -> int:
        return len(self.docs)

    @property
    def num_minibatches(self) -> int:
        return len(self.parts)

    def all_microbatches(self) -> list[dict[str, torch.Tensor]]:
        """Every micro-batch of the step, mini-batch by mini-batch (the log-prob passes' order)."""
        return [mb for mbs in self.microbatches for mb in mbs]

    def response_tokens(self, part: Sequence[int] | None = None) -> int:
        """Trained tokens (response tokens, EOS included) of the step, or of the documents ``part``."""
        ids = range(len(self.docs)) if part is None else part
        return sum(len(self.docs[d]) - self.prompt_lens[d] for d in ids)

    def plan_stats(self) -> dict[str, float]:
        """:meth:`RLPackPlan.stats`, averaged over the mini-batches."""
        first = self.plans[0].stats()
        return {key: sum(p.stats()[key] for p in self.plans) / len(self.plans) for key in first}


def pack_step(
    docs: list[list[int]],
    prompt_lens: list[int],
    token_values: dict[str, Sequence[Sequence[float]]],
    *,
    k: int,
    optim_steps: int,
    seq_len: int,
    dp: int,
    dp_rank: int,
    micro_batch_size: int,
    pad_id: int,
    layout: str = "thd",
    doc_routes: Sequence[torch.Tensor] | None = None,
) -> StepBatches:
    """Split the step into mini-batches (:func:`minibatch_parts`), plan each one's DP-balanced packing
    (:func:`plan_rl_packing`, the same on every rank) and collate this rank's micro-batches
    (:func:`collate_rl_rank`; ``doc_ids`` are step-wide document indices). ``token_values[name][d]``:
    per-token values of document ``d``'s response (the rollout log-probs); ``doc_routes[d]``: its
    tokens' recorded MoE routing (:func:`collate_rl_rank`)."""
    parts = minibatch_parts(len(docs), k, optim_steps)
    microbatches, plans = [], []
    for part in parts:
        plan = plan_rl_packing([len(docs[d]) for d in part], seq_len, dp, micro_batch_size)
        microbatches.append(
            collate_rl_rank(
                plan,
                dp_rank,
                [docs[d] for d in part],
                [prompt_lens[d] for d in part],
                pad_id,
                {name: [v[d] for d in part] for name, v in token_values.items()},
                doc_index=part,
                layout=layout,
                doc_routes=[doc_routes[d] for d in part] if doc_routes is not None else None,
            )
        )
        plans.append(plan)
    return StepBatches(docs, prompt_lens, parts, microbatches, plans)
