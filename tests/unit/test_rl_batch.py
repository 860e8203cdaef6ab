"""RL packing: every response token lands once where its label is, DP ranks are balanced."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_t1.data.rl_batch import collate_rl_rank, plan_rl_packing, rl_documents


def _lognormal_lengths(n: int, seed: int, cap: int) -> list[int]:
    rng = random.Random(seed)
    return [max(2, min(cap, int(rng.lognormvariate(4.5, 1.0)))) for _ in range(n)]


@pytest.mark.parametrize("dp", [1, 2, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dp_balance_on_lognormal_mix(dp, seed):
    seq = 2048
    lengths = _lognormal_lengths(256, seed, seq)
    plan = plan_rl_packing(lengths, seq, dp, micro_batch_size=2)
    placed = sorted(d for rank in plan.rows for row in rank for d in row)
    assert placed == list(range(len(lengths)))  # each document exactly once
    for rank in plan.rows:
        assert len(rank) == len(plan.rows[0]) and len(rank) % 2 == 0  # same micro-batch count
        for row in rank:
            assert sum(lengths[d] for d in row) <= seq
    st = plan.stats()
    assert st["dp_token_imbalance"] <= 1.05, st
    # packing beats one response per row by far on such a mix
    one_per_row = 1 - sum(lengths) / (len(lengths) * seq)
    assert st["pad_frac"] < 0.5 * one_per_row, (st, one_per_row)


def test_balance_is_not_vacuous():
    """Dealing documents round-robin in input order (no LPT) is measurably worse on the same mix."""
    lengths = _lognormal_lengths(64, 3, 2048)
    rr = [sum(lengths[i::4]) for i in range(4)]
    plan = plan_rl_packing(lengths, 2048, 4, 1)
    assert max(rr) / (sum(rr) / 4) > plan.stats()["dp_token_imbalance"]


@pytest.mark.parametrize("layout", ["mask", "thd"])
def test_collate_places_tokens_labels_and_values(layout):
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    responses = [[10, 11, 2], [12, 2], [13, 14, 15, 16, 2]]
    docs, plens, cut = rl_documents(prompts, responses, seq_len=12)
    assert cut == 0
    lp = [[-0.1 * (d + 1) - 0.01 * j for j in range(len(r))] for d, r in enumerate(responses)]
    plan = plan_rl_packing([len(d) for d in docs], 12, dp=1, micro_batch_size=2)
    mbs = collate_rl_rank(
        plan, 0, docs, plens, pad_id=0, token_values={"rollout_logprobs": lp}, layout=layout
    )
    seen = {}
    for mb in mbs:
        lab, m, ids, v = mb["labels"], mb["loss_mask"], mb["doc_ids"], mb["rollout_logprobs"]
        for pos in (m > 0).nonzero().tolist():
            d = int(ids[pos[0], pos[1]])
            seen.setdefault(d, []).append((int(lab[pos[0], pos[1]]), float(v[pos[0], pos[1]])))
        if layout == "mask":  # a token attends only to its own document, causally
            am = mb["attention_mask"]
            for r in range(am.shape[0]):
                for i in range(12):
                    allowed = (~am[r, 0, i]).nonzero().flatten().tolist()
                    assert allowed and max(allowed) == i
                    assert mb["position_ids"][r, i] == i - min(allowed)
        else:  # rows end to end; each document (and tail padding) is one cu_seqlens segment
            assert mb["tokens"].shape == (1, 24) and "attention_mask" not in mb
            cu = mb["cu_seqlens"].tolist()
            assert cu[0] == 0 and cu[-1] == 24 and 12 in cu  # the row boundary ends a segment
            for s, e in zip(cu[:-1], cu[1:]):
                assert mb["position_ids"][0, s:e].tolist() == list(range(e - s))
                assert len(set(ids[0, s:e].tolist()) - {-1}) <= 1  # one document per segment
    assert sorted(seen) == [0, 1, 2]
    for d, r in enumerate(responses):
        assert [t for t, _ in seen[d]] == r  # labels are exactly the response tokens, EOS included
        assert [round(x, 5) for _, x in seen[d]] == [round(x, 5) for x in lp[d]]


def test_truncation_and_errors():
    docs, plens, cut = rl_documents([[1, 2]], [[3, 4, 5, 6]], seq_len=4)
    assert cut == 1 and docs == [[1, 2, 3, 4]]
    with pytest.raises(ValueError, match="seq_length=2"):
        rl_documents([[1, 2]], [[3]], seq_len=2)
    with pytest.raises(ValueError, match="document 1 has 9 tokens"):
        plan_rl_packing([3, 9], 8, 1, 1)


def test_padding_rows_carry_no_loss():
    plan = plan_rl_packing([8, 8, 8], 8, dp=2, micro_batch_size=1)
    assert [len(r) for r in plan.rows] == [2, 2]
    docs = [[1] * 8, [2] * 8, [3] * 8]
    mbs = collate_rl_rank(plan, 1, docs, [4, 4, 4], pad_id=0)
    assert len(mbs) == 2 and float(mbs[1]["loss_mask"].sum()) == 0.0
    assert torch.equal(mbs[1]["doc_ids"], torch.full((1, 8), -1))


def test_minibatch_parts_keep_prompt_groups_whole_and_deal_them_round_robin():
    from megatron_t1.data.rl_batch import minibatch_parts

    assert minibatch_parts(6, 2, 1) == [[0, 1, 2, 3, 4, 5]]
    assert minibatch_parts(8, 2, 2) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert minibatch_parts(6, 3, 5) == [[0, 1, 2], [3, 4, 5]]  # at most one mini-batch per group
    for parts in (minibatch_parts(12, 3, 3), minibatch_parts(12, 4, 2)):
        assert sorted(d for p in parts for d in p) == list(range(12))
    with pytest.raises(ValueError, match="groups of k=4"):
        minibatch_parts(6, 4, 1)


def test_pack_step_is_the_plan_and_collate_of_each_mini_batch():
    from megatron_t1.data.rl_batch import pack_step

    g = torch.Generator().manual_seed(0)
    docs = [list(range(1, 3 + int(torch.randint(0, 9, (1,), generator=g)))) for _ in range(8)]
    plens = [2] * 8
    lps = [[-0.1 * (d + 1)] * (len(docs[d]) - 2) for d in range(8)]
    step = pack_step(
        docs, plens, {"rollout_logprobs": lps}, k=2, optim_steps=2, seq_len=16, dp=2, dp_rank=1,
        micro_batch_size=2, pad_id=0,
    )  # fmt: skip
    assert step.num_minibatches == 2 and step.parts == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert step.response_tokens() == sum(len(d) - 2 for d in docs)
    assert step.response_tokens([0, 1]) == len(docs[0]) + len(docs[1]) - 4
    for part, mbs, plan in zip(step.parts, step.microbatches, step.plans):
        want_plan = plan_rl_packing([len(docs[d]) for d in part], 16, 2, 2)
        assert plan.rows == want_plan.rows
        want = collate_rl_rank(
            want_plan, 1, [docs[d] for d in part], [2] * len(part), 0,
            {"rollout_logprobs": [lps[d] for d in part]}, doc_index=part,
        )  # fmt: skip
        assert len(mbs) == len(want)
        for a, b in zip(mbs, want):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[key], b[key]) for key in a if key != "max_seqlen")
    seen = {int(d) for mb in step.all_microbatches() for d in mb["doc_ids"].unique() if d >= 0}
    assert seen <= set(range(8))
    stats = step.plan_stats()
    assert stats["pad_frac"] == pytest.approx(sum(p.stats()["pad_frac"] for p in step.plans) / 2)
