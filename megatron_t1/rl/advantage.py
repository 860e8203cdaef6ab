"""Advantages of T1: reward shaped by the KL to the anchor, with a leave-one-out (RLOO) baseline.

T1 (arXiv 2501.11651, Sec. 3), for the K responses of one prompt:

    s_i = r_i - beta * KL_i,              A_i = s_i - (1 / (K - 1)) sum_{j != i} s_j = c (s_i - mean_j s_j),
                                          c = K / (K - 1).

"On-policy KL normalisation" (the ICML wording; its exact form is not public): centring KL_i by the mean
over the prompt's other samples before shaping changes nothing but the scale, because the RLOO baseline
already centres it:  A_i = c (r_i - mean r) - beta c (KL_i - mean KL).

GRPO (DeepSeekMath) is the named alternative for ablations: A_i = (s_i - mean s) / (std s + eps) with
the sample standard deviation (Bessel-corrected, as in TRL and verl).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from megatron_t1.rl.config import LossConfig

__all__ = ["grpo_advantages", "rloo_advantages", "shaped_rewards", "t1_advantages", "token_advantages"]


def _check_group(scores: Tensor, what: str) -> None:
    if scores.dim() != 2:
        raise ValueError(f"{what} expects [num_prompts, K] scores, got shape {tuple(scores.shape)}")
    if scores.shape[1] < 2:
        raise ValueError(
            f"{what} needs K >= 2 responses per prompt (the baseline of each response is the mean of the "
            f"others), got K = {scores.shape[1]}; sample more responses per prompt (rollout.n_samples)"
        )


def shaped_rewards(rewards: Tensor, kl: Tensor | None, *, beta: float) -> Tensor:
    """s = r - beta * KL, elementwise; [P, K] (or any matching shapes) in float32 or wider."""
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    s = rewards.to(dtype)
    if kl is None:
        return s
    if kl.shape != rewards.shape:
        raise ValueError(f"kl {tuple(kl.shape)} must match rewards {tuple(rewards.shape)}")
    return s - beta * kl.to(dtype)


def rloo_advantages(scores: Tensor) -> Tensor:
    """A_i = s_i - mean_{j != i} s_j within each row; [P, K] -> [P, K], K >= 2."""
    _check_group(scores, "RLOO")
    k = scores.shape[1]
    return scores - (scores.sum(dim=1, keepdim=True) - scores) / (k - 1)


def grpo_advantages(scores: Tensor, *, eps: float = 1e-6) -> Tensor:
    """A_i = (s_i - mean s) / (std s + eps) within each row (sample std); [P, K] -> [P, K], K >= 2.

    A row whose scores are all equal gets A = 0.
    """
    _check_group(scores, "GRPO")
    centred = scores - scores.mean(dim=1, keepdim=True)
    return centred / (scores.std(dim=1, keepdim=True) + eps)


def t1_advantages(
    rewards: Tensor,
    kl: Tensor | None,
    *,
    beta: float | None = None,
    method: Literal["rloo", "grpo"] | None = None,
    eps: float = 1e-6,
    config: LossConfig | None = None,
) -> Tensor:
    """Per-response advantages of T1: shape the reward with the anchor KL, then subtract the baseline.

    Args:
        rewards: [P, K] rewards r_i in {1, 0, -1} (or any real), K responses for each of P prompts.
        kl: [P, K] per-response KL_i (``response_kl`` with k1), or None for no KL shaping.
        beta: KL coefficient (T1: 2e-4). None: ``config.kl_coef``. Unused when ``kl`` is None.
        method: "rloo" (T1) or "grpo". None: ``config.advantage``.
        eps: GRPO's std guard.
        config: a ``LossConfig`` supplying the values not given (default: ``LossConfig()``).

    Returns:
        [P, K] advantages A_i (float32 or wider), to be broadcast to every response token (EOS included).
        Computed without gradient tracking of their own: rewards and KL are treated as constants.
    """
    cfg = config if config is not None else LossConfig()
    beta = cfg.kl_coef if beta is None else beta
    method = cfg.advantage if method is None else method
    with torch.no_grad():
        scores = shaped_rewards(rewards.detach(), None if kl is None else kl.detach(), beta=beta)
        if method == "rloo":
            return rloo_advantages(scores)
        if method == "grpo":
            return grpo_advantages(scores, eps=eps)
    raise ValueError(f"advantage method must be 'rloo' or 'grpo', got {method!r}")


def token_advantages(advantages: Tensor, seq_ids: Tensor, mask: Tensor) -> Tensor:
    """Broadcast per-response advantages to the tokens of a packed micro-batch.

    Args:
        advantages: [num_seqs] A_i of every response of the step (flattened [P, K]).
        seq_ids: any shape, the response index of every token (negative on padding: any value is
            fine where ``mask`` is 0).
        mask: same shape as ``seq_ids``, 1 on response tokens (EOS included), 0 elsewhere.

    Returns:
        ``A[seq_ids] * mask``, the shape of ``mask``: every response token carries its response's A_i.
    """
    return advantages[seq_ids.clamp(min=0)] * mask
