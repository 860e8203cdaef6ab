"""The T1 loss (arXiv 2501.11651, Sec. 3) of one micro-batch, as a pure function.

Per response token t of response i (prompt and padding masked out):

    l_t = pg_t - alpha_H * H_t  [+ beta * k(t) when kl_in = "loss"],
    pg_t = -A_i * log pi_theta(y_t)                                       one optimizer step per batch,
    pg_t = max(-A_i rho_t, -A_i clip(rho_t, 1 - eps, 1 + eps_high))       several (rho_t = pi_theta / pi_old),

with log pi_theta and the full-vocabulary entropy H_t of the sampling distribution (logits / tau, tau the
rollout temperature), both recomputed by the trainer, as are the anchor's log-probs on the same packed
batch. The rollout engine's log-probs enter only the mismatch metrics.

Aggregation is by name, with global denominators passed in so that the loss of a batch is exactly the sum
of the losses of its micro-batches (and of its data-parallel shards):

    token-mean:            L = sum_t l_t / N_tokens                        N_tokens: response tokens in the
                                                                           global batch
    seq-mean-token-mean:   L = sum_t l_t / (n_{i(t)} * N_seqs)             n_i: response tokens of response i
                                                                           (whole inside one micro-batch),
                                                                           N_seqs: responses in the batch

Metrics are detached tensors (no ``.item()``, no synchronisation), each a sum over this micro-batch's
response tokens divided by N_tokens: summed over micro-batches and data-parallel ranks once per step they
give the token mean over the global batch.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from megatron_t1.rl.config import LossConfig
from megatron_t1.rl.kl import kl_estimate, kl_k1, kl_k3

__all__ = ["LossOutput", "t1_loss", "token_weights"]


class LossOutput(NamedTuple):
    """loss: scalar, this micro-batch's share of the batch loss (differentiable).

    metrics: name -> detached scalar tensor; see ``t1_loss`` for the list and how to reduce them.
    """

    loss: Tensor
    metrics: dict[str, Tensor]


def token_weights(
    loss_mask: Tensor,
    *,
    aggregation: Literal["token-mean", "seq-mean-token-mean"],
    global_num_tokens: int | Tensor,
    global_num_seqs: int | Tensor | None = None,
    seq_ids: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Weight w_t of every token so that the aggregated loss is sum_t w_t l_t (see the module docstring).

    Args:
        loss_mask: [S, T] (one response per row) or any shape with ``seq_ids``; 1 on response tokens.
        aggregation: "token-mean" or "seq-mean-token-mean".
        global_num_tokens: N_tokens, response tokens in the whole global batch (token-mean).
        global_num_seqs: N_seqs, responses in the whole global batch (seq-mean-token-mean).
        seq_ids: same shape as ``loss_mask``, the response index of each token within this micro-batch
            (any value on masked tokens); None: rows of a 2-D ``loss_mask`` are the responses.

    Returns:
        weights shaped like ``loss_mask``, of dtype ``dtype``, 0 on masked tokens.
    """
    mask = loss_mask.to(dtype)
    if aggregation == "token-mean":
        return mask / global_num_tokens
    if aggregation != "seq-mean-token-mean":
        raise ValueError(f"aggregation must be 'token-mean' or 'seq-mean-token-mean', got {aggregation!r}")
    if global_num_seqs is None:
        raise ValueError("seq-mean-token-mean needs global_num_seqs (responses in the global batch)")
    if seq_ids is None:
        if mask.dim() != 2:
            raise ValueError("without seq_ids, loss_mask must be [S, T] with one response per row")
        seq_len = mask.sum(-1, keepdim=True)  # [S, 1]
        return mask / (seq_len.clamp(min=1) * global_num_seqs)
    ids = torch.where(mask > 0, seq_ids, 0).reshape(-1).long()
    # One slot per token bounds the number of responses without reading ids.max() (a device sync).
    counts = torch.zeros(max(1, ids.numel()), dtype=dtype, device=mask.device).index_add_(
        0, ids, mask.reshape(-1)
    )
    return mask / (counts[ids].view(mask.shape).clamp(min=1) * global_num_seqs)


def _resolve(config: LossConfig | None, **given: object) -> LossConfig:
    """The config with the explicitly given (non-None) hyperparameters replaced; validated again."""
    cfg = config if config is not None else LossConfig()
    return dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})


def t1_loss(
    logprobs: Tensor,
    entropy: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    global_num_tokens: int | Tensor,
    global_num_seqs: int | Tensor | None = None,
    seq_ids: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    anchor_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    config: LossConfig | None = None,
    entropy_coef: float | None = None,
    kl_coef: float | None = None,
    kl_in: Literal["reward", "loss"] | None = None,
    kl_estimator: Literal["k1", "k2", "k3"] | None = None,
    aggregation: Literal["token-mean", "seq-mean-token-mean"] | None = None,
    clip_eps: float | None = None,
    clip_eps_high: float | None = None,
) -> LossOutput:
    """The T1 loss of one micro-batch: policy gradient, entropy bonus, optional KL loss and clipping.

    All per-token tensors share one shape: [S, T] (one response per row) or packed (any shape, with
    ``seq_ids``). Hyperparameters left None come from ``config`` (default ``LossConfig()``).

    Args:
        logprobs: log pi_theta(y_t) of the sampled tokens under logits / tau (differentiable), e.g. from
            ``token_logprobs_and_entropy(..., temperature=rollout.temperature)``.
        entropy: H_t, full-vocabulary entropy of the same distribution (differentiable).
        advantages: A_i of each token's response (``t1_advantages``, broadcast to its tokens).
        loss_mask: 1 on response tokens (EOS included), 0 on prompt and padding.
        global_num_tokens: response tokens in the global batch (all micro-batches, all DP ranks).
        global_num_seqs: responses in the global batch; needed for seq-mean-token-mean.
        seq_ids: response index of each token within the micro-batch (packed layout).
        old_logprobs: log pi_old(y_t) (detached) when a rollout batch is split over several optimizer
            steps: enables the clipped importance ratio. None: on-policy, ratio 1.
        anchor_logprobs: log pi_anchor(y_t) recomputed by the trainer; needed for kl_in="loss", else
            only for the KL metrics.
        rollout_logprobs: the rollout engine's log-probs of the same tokens; only for mismatch metrics.
        config, entropy_coef, kl_coef, kl_in, kl_estimator, aggregation, clip_eps, clip_eps_high: see
            ``LossConfig``.

    Returns:
        ``LossOutput(loss, metrics)``. Metrics (detached; each a sum over this micro-batch's response
        tokens / global_num_tokens, so summing over micro-batches and DP ranks gives the global token
        mean): ``loss/pg``, ``loss/entropy``, ``loss/kl`` (the three terms in the chosen aggregation, also
        additive), ``entropy``, ``logprob``, ``adv_mean``, ``adv_sq_mean`` (std^2 = sq_mean - mean^2),
        ``num_tokens_frac``; with ``anchor_logprobs``: ``kl_k1``, ``kl_k3`` (token means of
        KL(pi_theta || pi_anchor)); with ``old_logprobs``: ``clip_frac``, ``ratio``; with
        ``rollout_logprobs``: ``mismatch_abs`` (|log pi_trainer - log pi_rollout|) and
        ``mismatch_kl_k3`` (k3 estimate of KL(pi_rollout || pi_trainer)).
    """
    cfg = _resolve(
        config,
        entropy_coef=entropy_coef,
        kl_coef=kl_coef,
        kl_in=kl_in,
        kl_estimator=kl_estimator,
        aggregation=aggregation,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
    )
    shape = logprobs.shape
    for name, t in (("entropy", entropy), ("advantages", advantages), ("loss_mask", loss_mask)):
        if t.shape != shape:
            raise ValueError(f"{name} {tuple(t.shape)} must match logprobs {tuple(shape)}")
    if cfg.kl_in == "loss" and anchor_logprobs is None:
        raise ValueError("kl_in='loss' needs anchor_logprobs")

    # float32, or float64 for float64 inputs (reference tests).
    cd = torch.promote_types(logprobs.dtype, torch.float32)
    logprobs = logprobs.to(cd)
    mask = loss_mask.to(cd)
    adv = advantages.detach().to(cd)
    w = token_weights(
        loss_mask,
        aggregation=cfg.aggregation,
        global_num_tokens=global_num_tokens,
        global_num_seqs=global_num_seqs,
        seq_ids=seq_ids,
        dtype=cd,
    )
    metrics: dict[str, Tensor] = {}

    if old_logprobs is None:
        pg = -adv * logprobs
    else:
        ratio = torch.exp(logprobs - old_logprobs.detach().to(cd))
        high = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
        unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1.0 - cfg.clip_eps, 1.0 + high)
        pg = torch.maximum(unclipped, clipped)
        with torch.no_grad():
            metrics["clip_frac"] = ((clipped > unclipped).to(cd) * mask).sum() / global_num_tokens
            metrics["ratio"] = (ratio * mask).sum() / global_num_tokens

    pg_loss = (pg * w).sum()
    ent_loss = -cfg.entropy_coef * (entropy.to(cd) * w).sum()
    loss = pg_loss + ent_loss
    kl_loss = torch.zeros((), dtype=cd, device=logprobs.device)
    if cfg.kl_in == "loss":
        k = kl_estimate(logprobs, anchor_logprobs.detach().to(cd), cfg.kl_estimator)
        kl_loss = cfg.kl_coef * (k * w).sum()
        loss = loss + kl_loss

    with torch.no_grad():
        tok = mask / global_num_tokens
        lp = logprobs.detach()
        metrics |= {
            "loss/pg": pg_loss.detach(),
            "loss/entropy": ent_loss.detach(),
            "loss/kl": kl_loss.detach(),
            "entropy": (entropy.detach().to(cd) * tok).sum(),
            "logprob": (lp * tok).sum(),
            "adv_mean": (adv * tok).sum(),
            "adv_sq_mean": (adv.square() * tok).sum(),
            "num_tokens_frac": tok.sum(),
        }
        if anchor_logprobs is not None:
            ref = anchor_logprobs.detach().to(cd)
            metrics["kl_k1"] = (kl_k1(lp, ref) * tok).sum()
            metrics["kl_k3"] = (kl_k3(lp, ref) * tok).sum()
        if rollout_logprobs is not None:
            # Samples come from the rollout engine: k3 with r = pi_trainer / pi_rollout estimates
            # KL(pi_rollout || pi_trainer).
            ro = rollout_logprobs.detach().to(cd)
            metrics["mismatch_abs"] = ((lp - ro).abs() * tok).sum()
            metrics["mismatch_kl_k3"] = (kl_k3(ro, lp) * tok).sum()
    return LossOutput(loss, metrics)
