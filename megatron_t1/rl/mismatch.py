"""The train/rollout mismatch: how far the trainer's log-probs are from the rollout engine's, and the
truncated importance-sampling (TIS) correction for it.

The responses are sampled by the rollout engine (vLLM, or transformers), whose numerics differ from
the trainer's (other kernels, bf16 KV cache, a weight copy one sync old when asynchronous). With
``log mu(y_t)`` the engine's log-prob and ``log pi(y_t)`` the trainer's, both under logits / tau:

    mismatch   = mean_t |log pi(y_t) - log mu(y_t)|,  max_t |...|        (a health metric, logged)
    w_t        = min(pi(y_t) / mu(y_t), C)                                (TIS; Yao et al., 2025)

``w_t`` multiplies the token's advantage, so the policy gradient estimates the trainer's policy's
gradient from the engine's samples, with the ratio capped at ``C`` (``loss.tis_cap``) to bound the
variance. Both are computed per micro-batch; their sums add over micro-batches and ranks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["MismatchStats", "TISWeights", "logprob_mismatch", "truncated_is_weights"]


class MismatchStats(NamedTuple):
    """|log pi - log mu| over the response tokens of a micro-batch: sum, count and max (float64 scalars;
    the max of no token is 0)."""

    abs_sum: Tensor
    count: Tensor
    max: Tensor


def logprob_mismatch(logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> MismatchStats:
    """Mismatch statistics of one micro-batch; ``logp``, ``rollout_logp``, ``mask`` of one shape."""
    m = mask > 0
    diff = (logp.double()[m] - rollout_logp.double()[m]).abs()
    worst = diff.max() if diff.numel() else torch.zeros((), dtype=torch.float64)
    return MismatchStats(diff.sum(), torch.tensor(float(diff.numel()), dtype=torch.float64), worst)


class TISWeights(NamedTuple):
    """``weights``: min(exp(log pi - log mu), cap) at every position (multiply by the mask before use);
    ``clipped``: response tokens whose ratio exceeded the cap; ``weight_sum``: sum of the capped weights
    over the response tokens (scalars in the inputs' dtype)."""

    weights: Tensor
    clipped: Tensor
    weight_sum: Tensor


def truncated_is_weights(logp: Tensor, rollout_logp: Tensor, mask: Tensor, *, cap: float) -> TISWeights:
    """The truncated importance weights of one micro-batch (module docstring); inputs of one shape."""
    if not cap > 0:
        raise ValueError(f"the TIS cap must be > 0, got {cap}")
    w = torch.exp(logp - rollout_logp)
    clipped = ((w > cap).to(mask.dtype) * mask).sum()
    w = w.clamp(max=cap)
    return TISWeights(w, clipped, (w * mask).sum())
