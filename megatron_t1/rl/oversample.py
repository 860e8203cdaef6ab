"""Oversampling (T1, arXiv 2501.11651, Sec. 3): keep k of the K responses sampled for each prompt.

Strategies, by name:
  * ``all``: keep every response (k = K); T1's default.
  * ``random``: k responses uniformly at random.
  * ``balanced``: as close to half correct (reward > 0) and half not as the group allows, the rest filled
    from the larger class; each class sampled uniformly.
  * ``drop_flat``: drop the prompts whose K rewards are all equal (their RLOO advantages are all zero, up
    to the KL term, so they carry no signal), then keep k at random from the others.
``drop_flat=True`` adds that filter to ``random`` or ``balanced``, applied to the kept subset.

Deterministic: the same rewards, k, strategy and seed give the same selection (one ``torch.Generator``
seeded with ``seed``, prompts visited in order).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = ["Selection", "Strategy", "gather_selected", "select_responses"]

Strategy = Literal["all", "random", "balanced", "drop_flat"]


class Selection(NamedTuple):
    """Which responses are kept.

    prompt_idx: [P'] int64 indices of the kept prompts (ascending).
    response_idx: [P', k] int64 indices into K of the kept responses of each kept prompt (ascending).
    """

    prompt_idx: Tensor
    response_idx: Tensor


def _balanced(correct: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k indices of one group [K] bool, as balanced between correct and incorrect as possible."""
    pos = torch.nonzero(correct).view(-1)
    neg = torch.nonzero(~correct).view(-1)
    pos = pos[torch.randperm(pos.numel(), generator=gen)]
    neg = neg[torch.randperm(neg.numel(), generator=gen)]
    # Odd k: the extra slot goes to the class with more responses available (ties: correct).
    n_pos = k // 2 + (k % 2 if pos.numel() >= neg.numel() else 0)
    n_pos = min(n_pos, pos.numel())
    n_neg = min(k - n_pos, neg.numel())
    n_pos = k - n_neg  # the other class could not fill its half: take the rest from this one
    return torch.cat([pos[:n_pos], neg[:n_neg]])


def select_responses(
    rewards: Tensor,
    *,
    k: int | None = None,
    strategy: Strategy = "all",
    drop_flat: bool = False,
    seed: int = 0,
) -> Selection:
    """Choose k of the K responses of every prompt.

    Args:
        rewards: [P, K] rewards (T1: 1 correct, 0 wrong, -1 penalised); "correct" means reward > 0.
        k: responses kept per prompt, 1 <= k <= K; None means K. ``all`` requires k = K.
        strategy: "all", "random", "balanced" or "drop_flat" (see the module docstring).
        drop_flat: also drop prompts whose kept rewards are all equal (implied by "drop_flat").
        seed: seed of the selection's random generator.

    Returns:
        ``Selection(prompt_idx [P'], response_idx [P', k])``; P' may be 0 when every group is dropped.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_prompts, K], got shape {tuple(rewards.shape)}")
    num_prompts, big_k = rewards.shape
    k = big_k if k is None else k
    if not 1 <= k <= big_k:
        raise ValueError(f"k must be in [1, K={big_k}], got {k}")
    if strategy == "all" and k != big_k:
        raise ValueError(f"strategy 'all' keeps all K={big_k} responses, not k={k}: use random or balanced")
    if strategy not in ("all", "random", "balanced", "drop_flat"):
        raise ValueError(f"unknown strategy {strategy!r}; expected all, random, balanced or drop_flat")
    rewards = rewards.detach().cpu()
    gen = torch.Generator().manual_seed(seed)
    kept_prompts, kept = [], []
    for i in range(num_prompts):
        group = rewards[i]
        if strategy == "drop_flat" and bool((group == group[0]).all()):
            continue
        if strategy == "all" or k == big_k:
            idx = torch.arange(big_k)
        elif strategy == "balanced":
            idx = _balanced(group > 0, k, gen)
        else:  # random, drop_flat
            idx = torch.randperm(big_k, generator=gen)[:k]
        idx, _ = idx.sort()
        if drop_flat and bool((group[idx] == group[idx][0]).all()):
            continue
        kept_prompts.append(i)
        kept.append(idx)
    response_idx = torch.stack(kept) if kept else torch.empty(0, k, dtype=torch.long)
    return Selection(torch.tensor(kept_prompts, dtype=torch.long), response_idx)


def gather_selected(values: Tensor, selection: Selection) -> Tensor:
    """values [P, K, ...] -> [P', k, ...]: the kept responses, in the order of ``selection``."""
    rows = values[selection.prompt_idx.to(values.device)]
    idx = selection.response_idx.to(values.device)
    idx = idx.view(*idx.shape, *([1] * (values.dim() - 2))).expand(*idx.shape, *values.shape[2:])
    return torch.gather(rows, 1, idx)
