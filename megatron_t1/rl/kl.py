"""Per-token estimators of KL(pi_theta || pi_anchor) and their per-response reduction.

Tokens y ~ pi_theta (the sampling distribution); with log r = log pi_theta(y) - log pi_anchor(y):

    k1 = log r                      unbiased: E_{pi_theta}[k1] = KL(pi_theta || pi_anchor); can be negative
    k2 = (log r)^2 / 2              biased (second order in log r), >= 0, low variance
    k3 = 1/r - 1 + log r            unbiased and >= 0 (since x - 1 >= log x with x = 1/r), low variance

(J. Schulman, "Approximating KL divergence", 2020.) T1 (arXiv 2501.11651, Sec. 3) shapes the reward with
the per-response sum of k1 over the response tokens: s_i = r_i - beta * KL_i. k2 and k3 are only allowed
as an explicit loss term (``LossConfig.kl_in = "loss"``). Note that as a loss, k1's gradient is the
score function, whose expectation under pi_theta is zero: use k2 or k3 there.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "KLEstimator",
    "ResponseKLParts",
    "finish_response_kl",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "response_kl",
    "response_kl_parts",
    "sequence_reduce",
]

KLEstimator = Literal["k1", "k2", "k3"]


def kl_k1(logp: Tensor, logp_anchor: Tensor) -> Tensor:
    """k1 = log pi_theta(y) - log pi_anchor(y), per token; inputs and output [...]."""
    return logp - logp_anchor


def kl_k2(logp: Tensor, logp_anchor: Tensor) -> Tensor:
    """k2 = (log pi_theta(y) - log pi_anchor(y))^2 / 2, per token; inputs and output [...]."""
    return 0.5 * (logp - logp_anchor).square()


def kl_k3(logp: Tensor, logp_anchor: Tensor) -> Tensor:
    """k3 = exp(d) - 1 - d with d = log pi_anchor(y) - log pi_theta(y), per token; [...] -> [...].

    ``expm1`` keeps it accurate (and exactly 0) when the two log-probs are close.
    """
    d = logp_anchor - logp
    return torch.expm1(d) - d


_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp: Tensor, logp_anchor: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_anchor) by name ("k1", "k2" or "k3"); [...] -> [...]."""
    if estimator not in _ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {sorted(_ESTIMATORS)}")
    return _ESTIMATORS[estimator](logp, logp_anchor)


def sequence_reduce(
    values: Tensor,
    mask: Tensor,
    *,
    reduce: Literal["sum", "mean"] = "sum",
    seq_ids: Tensor | None = None,
    num_seqs: int | None = None,
) -> Tensor:
    """Sum or mean of per-token ``values`` over the masked tokens of each sequence.

    Two layouts:
      * padded: ``values``, ``mask`` [S, T], one sequence per row -> [S];
      * packed: ``values``, ``mask``, ``seq_ids`` [N] (any shape, same for all three), sequence index of
        every token in [0, num_seqs) (padding may carry any id, it must be masked) -> [num_seqs].
    A sequence with no masked token reduces to 0 (sum) or 0 (mean, not nan).
    """
    mask = mask.to(values.dtype)
    if seq_ids is None:
        if values.dim() != 2:
            raise ValueError(f"padded layout needs [S, T] values, got {tuple(values.shape)}; or pass seq_ids")
        total, count = (values * mask).sum(-1), mask.sum(-1)
    else:
        if num_seqs is None:
            raise ValueError("the packed layout (seq_ids) needs num_seqs")
        ids = torch.where(mask.reshape(-1) > 0, seq_ids.reshape(-1), 0)
        total = values.new_zeros(num_seqs).index_add_(0, ids, (values * mask).reshape(-1))
        count = values.new_zeros(num_seqs).index_add_(0, ids, mask.reshape(-1))
    if reduce == "sum":
        return total
    if reduce == "mean":
        return total / count.clamp(min=1)
    raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")


def response_kl(
    logp: Tensor,
    logp_anchor: Tensor,
    mask: Tensor,
    *,
    estimator: KLEstimator = "k1",
    reduce: Literal["sum", "mean"] = "sum",
    seq_ids: Tensor | None = None,
    num_seqs: int | None = None,
) -> Tensor:
    """KL_i of every response: the per-token estimator summed (T1) or averaged over its response tokens.

    Args:
        logp, logp_anchor: per-token log pi_theta(y_t) and log pi_anchor(y_t) of the sampled tokens under
            the sampling distribution (logits / tau), both recomputed by the trainer; [S, T] padded or [N]
            packed.
        mask: 1 on response tokens (EOS included), 0 on prompt and padding; same shape.
        estimator: "k1" for the reward (the only unbiased one T1 allows there).
        reduce: "sum" (T1: KL_i = sum_t k1) or "mean" over the response's tokens.
        seq_ids, num_seqs: packed layout, see ``sequence_reduce``.

    Returns:
        [S] (or [num_seqs]) per-response KL, no gradient attached if the inputs carry none.
    """
    per_token = kl_estimate(logp, logp_anchor, estimator)
    return sequence_reduce(per_token, mask, reduce=reduce, seq_ids=seq_ids, num_seqs=num_seqs)


class ResponseKLParts(NamedTuple):
    """Per-response k1 sums and token counts of one packed micro-batch, float64 (``[num_seqs]`` each).

    Additive over micro-batches and data-parallel ranks, so the loop sums the parts of all of them
    before dividing (:func:`finish_response_kl`): a response's KL never depends on how it was packed.
    """

    kl_sum: Tensor
    tokens: Tensor


def response_kl_parts(
    logp: Tensor, logp_anchor: Tensor, mask: Tensor, seq_ids: Tensor, num_seqs: int
) -> ResponseKLParts:
    """sum_t (log pi_theta(y_t) - log pi_anchor(y_t)) and the token count of every response.

    Args:
        logp, logp_anchor: per-token log-probs of the sampled tokens, any shape (e.g. [b, S] or [1, b*S]).
        mask: same shape, > 0 on response tokens (EOS included).
        seq_ids: same shape, the response index in [0, num_seqs) of every masked token (others ignored).
        num_seqs: the number of responses (of the whole step, not only this micro-batch).

    Unlike :func:`sequence_reduce` the unmasked tokens are dropped, not multiplied by 0, so a
    non-finite log-prob on a padding position cannot reach any response.
    """
    m = mask > 0
    ids = seq_ids[m]
    k1 = kl_k1(logp.double()[m], logp_anchor.double()[m])
    kl_sum = torch.zeros(num_seqs, dtype=torch.float64).index_add_(0, ids, k1)
    tokens = torch.zeros(num_seqs, dtype=torch.float64).index_add_(0, ids, torch.ones_like(k1))
    return ResponseKLParts(kl_sum, tokens)


def finish_response_kl(kl_sum: Tensor, tokens: Tensor, reduce: Literal["sum", "mean"] = "sum") -> Tensor:
    """KL_i from the summed parts: the sum (T1) or the mean over the response's tokens (0 tokens: 0)."""
    if reduce == "sum":
        return kl_sum / 1.0
    if reduce == "mean":
        return kl_sum / tokens.clamp(min=1)
    raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
