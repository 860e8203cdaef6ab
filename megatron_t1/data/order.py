"""The data order of a run: a pure function of (seed, step), so a resumed run sees the same batches.

Each epoch is a fresh seeded permutation (``seed + epoch``); epochs are laid end to end and step
``s`` takes positions ``[s * per_step, (s + 1) * per_step)`` of that endless sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def step_slice(items: Sequence[T], step: int, per_step: int, seed: int) -> list[T]:
    """Items of step ``step`` (0-based); each epoch's permutation is computed once per call."""
    n = len(items)
    if n == 0:
        raise ValueError("step_slice: no items")
    out: list[T] = []
    perms: dict[int, torch.Tensor] = {}
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(items[int(perms[epoch][i])])
    return out
