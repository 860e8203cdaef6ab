"""Keeping k of K responses per prompt."""

from __future__ import annotations

import pytest
import torch

from megatron_t1.rl.oversample import gather_selected, select_responses


def _rewards():
    return torch.tensor(
        [
            [1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0],  # 2 correct
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # flat
            [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0],  # 6 correct
            [-1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # none correct, not flat
        ]
    )


def test_all_keeps_everything():
    sel = select_responses(_rewards())
    assert sel.prompt_idx.tolist() == [0, 1, 2, 3]
    assert sel.response_idx.tolist() == [list(range(8))] * 4
    with pytest.raises(ValueError, match="all"):
        select_responses(_rewards(), k=4, strategy="all")


def test_random_is_deterministic_under_seed():
    a = select_responses(_rewards(), k=4, strategy="random", seed=7)
    b = select_responses(_rewards(), k=4, strategy="random", seed=7)
    assert torch.equal(a.response_idx, b.response_idx)
    others = [select_responses(_rewards(), k=4, strategy="random", seed=s).response_idx for s in range(8, 14)]
    assert any(not torch.equal(a.response_idx, o) for o in others)
    for row in a.response_idx:
        assert len(set(row.tolist())) == 4 and row.tolist() == sorted(row.tolist())


def test_balanced_counts():
    rewards = _rewards()
    for k in (4, 5):
        sel = select_responses(rewards, k=k, strategy="balanced", seed=3)
        kept = gather_selected(rewards, sel)
        n_correct = (kept > 0).sum(1).tolist()
        # Prompt 0 has only 2 correct: both kept. Prompt 1 is all correct. Prompt 2 has 2 incorrect.
        # Prompt 3 has none. Odd k: the extra slot goes to the larger class.
        assert n_correct == [2, k, k - 2, 0]
    sel = select_responses(rewards, k=4, strategy="balanced", seed=3)
    assert torch.equal(
        sel.response_idx, select_responses(rewards, k=4, strategy="balanced", seed=3).response_idx
    )


def test_drop_flat():
    sel = select_responses(_rewards(), strategy="drop_flat")
    assert sel.prompt_idx.tolist() == [0, 2, 3] and sel.response_idx.shape == (3, 8)
    # As a filter on the kept subset: a balanced subset is flat only when the group has a single class.
    for seed in range(4):
        sel = select_responses(_rewards(), k=2, strategy="balanced", drop_flat=True, seed=seed)
        assert {0, 2} <= set(sel.prompt_idx.tolist()) and 1 not in sel.prompt_idx.tolist()
        kept = gather_selected(_rewards(), sel)
        assert (kept[:, 0] != kept[:, 1]).all()  # no kept subset is flat
    empty = select_responses(torch.zeros(2, 4), strategy="drop_flat")
    assert empty.prompt_idx.numel() == 0 and empty.response_idx.shape == (0, 4)


def test_gather_selected_with_trailing_dims_and_errors():
    rewards = _rewards()
    values = torch.arange(4 * 8 * 3).view(4, 8, 3)
    sel = select_responses(rewards, k=3, strategy="random", seed=1)
    out = gather_selected(values, sel)
    for i, p in enumerate(sel.prompt_idx.tolist()):
        for j, r in enumerate(sel.response_idx[i].tolist()):
            assert torch.equal(out[i, j], values[p, r])
    with pytest.raises(ValueError, match="k must be"):
        select_responses(rewards, k=9, strategy="random")
    with pytest.raises(ValueError, match="unknown strategy"):
        select_responses(rewards, k=2, strategy="best")
