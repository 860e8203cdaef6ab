"""Packing: no token lost, positions restart, labels and mask against plain double loops."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_t1.data.packing import (
    IGNORE_INDEX,
    block_diagonal_causal_mask,
    collate_packed,
    micro_batches,
    pack_sequences,
)

PAD = 0


def _docs(n: int, seed: int, max_len: int = 40) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        length = rng.randint(1, max_len)
        ids = [rng.randint(1, 99) for _ in range(length)]
        cut = rng.randint(0, length)  # prompt = first `cut` tokens (mask 0), then the response
        docs.append((ids, [0] * cut + [1] * (length - cut)))
    return docs


def _unpack(rows):
    """Recover the documents from the rows with plain loops over segment ids."""
    out = []
    for r in rows:
        for d in range(r.n_docs):
            idx = [t for t in range(len(r.tokens)) if r.segment_ids[t] == d]
            assert idx == list(range(idx[0], idx[-1] + 1))  # contiguous
            out.append([r.tokens[t] for t in idx])
    return out


def test_no_token_lost_and_rows_are_full_length():
    docs = _docs(200, 0)
    rows = pack_sequences(docs, 64, PAD)
    assert all(len(r.tokens) == 64 for r in rows)
    for f in ("labels", "loss_mask", "position_ids", "segment_ids"):
        assert all(len(getattr(r, f)) == 64 for r in rows)
    assert sorted(_unpack(rows)) == sorted(ids for ids, _ in docs)
    total = sum(len(ids) for ids, _ in docs)
    assert len(rows) >= -(-total // 64)
    assert len(rows) <= -(-total // 64) + 10  # best fit leaves little room on random lengths
    assert pack_sequences(docs, 64, PAD) == rows  # deterministic


def test_positions_labels_and_loss_mask_against_a_loop():
    docs = _docs(80, 1)
    rows = pack_sequences(docs, 50, PAD)
    masks = {tuple(ids): mask for ids, mask in docs}
    for r in rows:
        for t in range(50):
            seg = r.segment_ids[t]
            start = r.segment_ids.index(seg)
            assert r.position_ids[t] == t - start  # restart per document (and for the padding)
            if seg == r.n_docs:
                assert r.tokens[t] == PAD and r.labels[t] == IGNORE_INDEX
                continue
            doc = [r.tokens[u] for u in range(50) if r.segment_ids[u] == seg]
            mask = masks[tuple(doc)]
            j = t - start
            expected = doc[j + 1] if j + 1 < len(doc) and mask[j + 1] else IGNORE_INDEX
            assert r.labels[t] == expected
            assert r.loss_mask[t] == int(expected != IGNORE_INDEX)
    n_targets = sum(sum(m[1:]) for _, m in docs)  # a document's first token is never a target
    assert sum(sum(r.loss_mask) for r in rows) == n_targets


def test_block_diagonal_causal_mask_against_a_double_loop():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 3, 3], [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]])
    mask = block_diagonal_causal_mask(seg)
    assert mask.shape == (2, 1, 10, 10) and mask.dtype == torch.bool
    for b in range(2):
        for i in range(10):
            for j in range(10):
                allowed = bool(seg[b, i] == seg[b, j]) and j <= i
                assert bool(mask[b, 0, i, j]) == (not allowed)  # Megatron: True = masked out
    assert not mask[:, 0].all(dim=-1).any()  # no fully masked query row (no NaN in a softmax)


def test_long_documents_are_truncated_with_a_count():
    docs = [([1] * 10, [1] * 10), ([2] * 30, [1] * 30), ([3] * 25, [0] * 5 + [1] * 20)]
    with pytest.warns(UserWarning, match="2 documents longer than 16"):
        rows = pack_sequences(docs, 16, PAD)
    assert sorted(_unpack(rows)) == sorted([[1] * 10, [2] * 16, [3] * 16])


def test_dict_inputs_and_validation():
    rows = pack_sequences([{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, ([], [])], 4, PAD)
    assert len(rows) == 1 and rows[0].tokens == [5, 6, 7, PAD] and rows[0].labels == [6, 7, -100, -100]
    with pytest.raises(ValueError, match="lengths differ"):
        pack_sequences([([1, 2], [1])], 8, PAD)


def test_collate_and_micro_batches():
    rows = pack_sequences(_docs(60, 2), 48, PAD)
    batches = list(micro_batches(rows, 4, layout="mask"))
    assert sum(b["tokens"].shape[0] for b in batches) == len(rows)
    b = batches[0]
    assert b["tokens"].shape == b["labels"].shape == b["loss_mask"].shape == (4, 48)
    assert b["tokens"].dtype == torch.long and b["loss_mask"].dtype == torch.float32
    assert b["attention_mask"].shape == (4, 1, 48, 48) and "cu_seqlens" not in b
    assert torch.equal(b["loss_mask"], (b["labels"] != IGNORE_INDEX).float())
    meg = collate_packed(rows[:4], ignore_index=PAD)
    assert "attention_mask" not in meg and int(meg["labels"].min()) >= 0  # Megatron wants valid ids
    assert meg["tokens"].shape == (1, 4 * 48)  # THD: the rows end to end
    assert torch.equal(meg["labels"][meg["loss_mask"].bool()], b["labels"][b["loss_mask"].bool()])
    if len(rows) % 4:
        assert len(list(micro_batches(rows, 4, drop_last=True))) == len(rows) // 4
    with pytest.raises(ValueError, match="packed layout 'bshd'"):
        collate_packed(rows[:1], layout="bshd")


def _segments_by_hand(rows):
    """(start, end) of every document and tail padding of rows laid end to end, walked in Python."""
    out, base = [], 0
    for r in rows:
        start = 0
        for t in range(1, len(r.segment_ids) + 1):
            if t == len(r.segment_ids) or r.segment_ids[t] != r.segment_ids[start]:
                out.append((base + start, base + t))
                start = t
        base += len(r.segment_ids)
    return out


def test_thd_offsets_describe_every_document():
    rows = pack_sequences(_docs(40, 5), 64, PAD)
    b = collate_packed(rows[:3])
    cu = b["cu_seqlens"].tolist()
    assert b["cu_seqlens"].dtype == torch.int32
    assert list(zip(cu[:-1], cu[1:])) == _segments_by_hand(rows[:3])
    assert b["max_seqlen"] == max(e - s for s, e in zip(cu[:-1], cu[1:]))
    for s, e in zip(cu[:-1], cu[1:]):  # positions restart at every document
        assert b["position_ids"][0, s:e].tolist() == list(range(e - s))
    # a full row (no tail padding) still ends a segment at the row boundary
    full = pack_sequences([([1] * 8, [1] * 8), ([2] * 8, [1] * 8)], 8, PAD)
    assert collate_packed(full)["cu_seqlens"].tolist() == [0, 8, 16]


def _allocated_bytes(fn) -> tuple[int, int]:
    """(bytes torch's CPU allocator handed out, peak of Python's own allocations) while ``fn`` runs.

    tracemalloc sees Python objects (the token lists) but not tensors, whose memory comes from
    torch's allocator; the profiler's memory events see those. Two runs: the profiler's own records
    would count as Python allocations.
    """
    import tracemalloc

    from torch.profiler import ProfilerActivity, profile

    tracemalloc.start()
    fn()
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    torch_bytes = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())
    return torch_bytes, py_peak


def test_a_17k_token_thd_row_allocates_far_less_than_s_squared():
    S = 17_408  # the 32B example's data.seq_length
    lengths = [9_000, 5_000, 3_000]  # three responses, 408 tokens of tail padding
    docs = [([7] * n, [0] * 100 + [1] * (n - 100)) for n in lengths]
    rows = pack_sequences(docs, S, PAD)
    assert len(rows) == 1
    thd_tensors, thd_python = _allocated_bytes(lambda: collate_packed(rows, ignore_index=PAD))
    mask_tensors, _ = _allocated_bytes(lambda: collate_packed(rows, ignore_index=PAD, layout="mask"))
    # the dense layout is what the measurement would catch: >= one [S, S] bool mask (303 MB)
    assert mask_tensors >= S * S, mask_tensors
    # THD: a few int64 / float32 tensors of S tokens, well under 1% of S^2 bytes
    assert thd_tensors < S * S / 100, thd_tensors
    assert thd_python < S * S / 100, thd_python
    # the RL micro-batch of the same three responses (prompt 100 tokens each)
    from megatron_t1.data.rl_batch import collate_rl_rank, plan_rl_packing

    plan = plan_rl_packing(lengths, S, dp=1, micro_batch_size=1)
    ids = [[7] * n for n in lengths]
    rl_thd, _ = _allocated_bytes(lambda: collate_rl_rank(plan, 0, ids, [100] * 3, pad_id=PAD))
    rl_mask, _ = _allocated_bytes(lambda: collate_rl_rank(plan, 0, ids, [100] * 3, pad_id=PAD, layout="mask"))
    assert rl_mask >= S * S and rl_thd < S * S / 100, (rl_mask, rl_thd)


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_packed_forward_equals_separate_forwards(one_thread):
    """The mask really isolates documents: a packed Qwen2 forward equals one forward per document."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    docs = [(ids, [1] * len(ids)) for ids in ([3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15, 16, 17])]
    rows = pack_sequences(docs, 20, PAD)
    assert len(rows) == 1
    b = collate_packed(rows, layout="mask")
    with torch.no_grad():
        # HF's 4-D boolean mask means True = attend: the complement of Megatron's convention.
        packed = model(
            input_ids=b["tokens"], position_ids=b["position_ids"], attention_mask=~b["attention_mask"]
        )
        for d, (ids, _) in enumerate(docs):
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            sel = (b["segment_ids"][0] == d).nonzero().flatten()
            torch.testing.assert_close(packed.logits[0, sel], alone, atol=1e-5, rtol=1e-5)
