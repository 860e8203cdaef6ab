"""Token log-probabilities and full-vocabulary entropy, chunked, vocab-parallel, without [T, V] fp32 copies.

For logits x (one row per token, V columns) at sampling temperature tau, with z = x / tau:

    log pi(y)  = z_y - lse(z),                        lse(z) = m + log s,  m = max_v z_v,
    H          = -sum_v p_v log p_v = log s - w / s,   s = sum_v e^(z_v - m),  w = sum_v e^(z_v - m)(z_v - m).

The three per-token statistics (m, s, w) merge across blocks of the vocabulary (another tensor-parallel
shard, or another vocabulary tile of the fused output layer) as in an online softmax:
M = max(m1, m2); s = sum_i e^(m_i - M) s_i; w = sum_i e^(m_i - M) (w_i + (m_i - M) s_i).
With a TP group that is one all-reduce MAX of m and one all-reduce SUM of (s, w, z_y) per call.

Gradients (per token, g_lp and g_H the incoming gradients of log pi(y) and H):

    d log pi(y) / d z_v = 1[v = y] - p_v,      d H / d z_v = -p_v (log p_v + H),
    d L / d x_v = (1/tau) [ g_lp 1[v = y] - p_v (g_lp + g_H (log p_v + H)) ].

Backward recomputes log p_v chunk by chunk from the saved per-token lse and H, so the only [T, V] tensor
ever allocated is the returned gradient. Padded vocabulary rows (global index >= ``vocab_size``, added
by Megatron so the vocabulary splits evenly over TP ranks) are excluded: they get probability 0 and
gradient 0, as in transformers and vLLM whose vocabularies are not padded.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_t1.rl.chunks import chunk_rows

__all__ = ["VocabShard", "token_logprobs_and_entropy", "vocab_shard"]


class VocabShard(NamedTuple):
    """This rank's slice of the (padded) vocabulary: global ids ``[start, start + local)``.

    Columns ``[0, valid)`` of the local logits are real tokens; ``[valid, local)`` are TP padding.
    """

    start: int
    local: int
    valid: int


def vocab_shard(v_local: int, tp_group: Any = None, vocab_size: int | None = None) -> VocabShard:
    """The vocabulary shard of this rank: Megatron's VocabUtility convention, start = rank * V_local.

    Args:
        v_local: columns of the local logits (the padded vocabulary divided by the TP size).
        tp_group: the tensor-parallel process group, or None for a single shard.
        vocab_size: the real vocabulary size (<= V_local * TP size); None means no padding.
    """
    rank, world = (0, 1) if tp_group is None else (dist.get_rank(tp_group), dist.get_world_size(tp_group))
    padded = v_local * world
    if vocab_size is None:
        vocab_size = padded
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, V_local * tp = {padded}]")
    start = rank * v_local
    return VocabShard(start, v_local, min(max(vocab_size - start, 0), v_local))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# Per-token statistics of a block of logits, and their merge across blocks
# --------------------------------------------------------------------------------------------------


def shifted_stats(zs: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
    """(s, w) of each row of zs = z - m [C, Vb]: s = sum_v e^(zs_v), w = sum_v e^(zs_v) zs_v; [C] each.

    ``e`` is a [C, Vb] scratch buffer for the exponentials (reused across chunks: on CPU a fresh
    allocation per chunk costs page faults that take longer than the arithmetic); it ends up holding
    e * zs.
    """
    torch.exp(zs, out=e)
    s = e.sum(dim=-1)
    # Not a batched matmul [1, Vb] @ [Vb, 1]: BLAS accumulates such a dot product sequentially in fp32
    # (relative error 2e-5 at Vb = 32k, 10x the entropy error of the naive softmax); sum() is pairwise.
    return s, e.mul_(zs).sum(dim=-1)


def tile_stats_(z: Tensor, e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(m, s, w) of each row of ``z`` [C, Vb] (already divided by tau); overwrites ``z`` with z - m.

    Returns three [C] tensors: m = max_v z_v, s = sum_v e^(z_v - m), w = sum_v e^(z_v - m) (z_v - m).
    """
    m = z.amax(dim=-1)
    z.sub_(m.unsqueeze(-1))
    return (m, *shifted_stats(z, e))


def scratch(storage: Tensor, rows: int, cols: int) -> Tensor:
    """A contiguous [rows, cols] view at the start of a flat scratch ``storage`` of >= rows * cols."""
    return storage[: rows * cols].view(rows, cols)


def merge_stats(
    a: tuple[Tensor, Tensor, Tensor] | None, b: tuple[Tensor, Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Combine the (m, s, w) of two disjoint vocabulary blocks into those of their union."""
    if a is None:
        return b
    m = torch.maximum(a[0], b[0])
    s = torch.zeros_like(a[1])
    w = torch.zeros_like(a[2])
    for mi, si, wi in (a, b):
        s, w = _accumulate_rescaled(s, w, mi, si, wi, m)
    return m, s, w


def _accumulate_rescaled(
    s: Tensor, w: Tensor, mi: Tensor, si: Tensor, wi: Tensor, m: Tensor
) -> tuple[Tensor, Tensor]:
    """s += e^(mi - m) si; w += e^(mi - m)(wi + (mi - m) si); blocks with no mass (si = 0) add nothing."""
    scale = torch.exp(mi - m)
    # A block with no real tokens has mi = -inf: (mi - m) * si would be -inf * 0 = nan.
    w_term = torch.where(si > 0, scale * (wi + (mi - m) * si), torch.zeros_like(wi))
    return s + scale * si, w + w_term


def allreduce_stats(
    m: Tensor, s: Tensor, w: Tensor, z_target: Tensor, group: Any
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reduce per-token (m, s, w) and the target logit across the vocab shards of ``group``.

    Two collectives: MAX of m, then one SUM of the stacked, rescaled (s, w) and z_target (the target
    logit is nonzero only on the rank that owns the target id).
    """
    m_global = m.clone()
    dist.all_reduce(m_global, op=dist.ReduceOp.MAX, group=group)
    s_r, w_r = _accumulate_rescaled(torch.zeros_like(s), torch.zeros_like(w), m, s, w, m_global)
    buf = torch.stack([s_r, w_r, z_target])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return m_global, buf[0], buf[1], buf[2]


def finish_stats(m: Tensor, s: Tensor, w: Tensor, z_target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(log pi(y), H, lse) per token from the merged statistics: log pi(y) = z_y - lse, H = log s - w/s."""
    log_s = torch.log(s)
    lse = m + log_s
    return z_target - lse, log_s - w / s, lse, log_s


def target_columns(targets: Tensor, shard: VocabShard) -> tuple[Tensor, Tensor]:
    """Local column of each target id (clamped into range) and whether this shard owns it.

    Targets outside [0, vocab_size) (e.g. an ignore index at prompt positions) are owned by no shard:
    their log-prob is a finite, meaningless -lse and they must be masked by the caller.
    """
    local = targets - shard.start
    owned = (local >= 0) & (local < shard.valid)
    return local.clamp(0, max(shard.valid - 1, 0)), owned


def grad_coefficients(
    g_lp: Tensor | None, g_H: Tensor | None, H: Tensor, inv_tau: float, like: Tensor
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-token (a, b, c) with dL/dx_v = p_v (a + b log p_v) + c 1[v = y].

    a = -(g_lp + g_H H) / tau, b = -g_H / tau (None when H has no gradient), c = g_lp / tau.
    """
    zero = torch.zeros_like(like)
    g_lp = zero if g_lp is None else g_lp.to(like.dtype)
    a = -g_lp * inv_tau
    b = None
    if g_H is not None:
        g_H = g_H.to(like.dtype)
        a = a - g_H * H * inv_tau
        b = -g_H * inv_tau
    return a, b, g_lp * inv_tau


def grad_from_logp_(
    logp: Tensor, p: Tensor, a: Tensor, b: Tensor | None, c: Tensor, cols: Tensor, owned: Tensor
) -> Tensor:
    """Turn a chunk of log p [C, Vb] into dL/dx [C, Vb] in place (see ``grad_coefficients``).

    ``p`` is a [C, Vb] scratch buffer; ``cols`` [C] are the target columns relative to this chunk and
    ``owned`` [C] says whether the target is in it.
    """
    torch.exp(logp, out=p)
    if b is None:
        torch.mul(p, a.unsqueeze(-1), out=logp)
    else:
        torch.addcmul(a.unsqueeze(-1), b.unsqueeze(-1), logp, out=logp)
        logp.mul_(p)
    logp.scatter_add_(1, cols.unsqueeze(-1), torch.where(owned, c, torch.zeros_like(c)).unsqueeze(-1))
    return logp


# --------------------------------------------------------------------------------------------------
# The autograd function over logits
# --------------------------------------------------------------------------------------------------


class _TokenLogprobEntropy(torch.autograd.Function):
    """(log pi(y), H) of every row of logits [N, V_local], chunked over rows; see the module docstring."""

    @staticmethod
    def forward(ctx, logits, targets, tp_group, vocab_size, chunk_size, temperature):
        n, v_local = logits.shape
        shard = vocab_shard(v_local, tp_group, vocab_size)
        cd = compute_dtype(logits.dtype)
        inv_tau = 1.0 / temperature
        cols, owned = target_columns(targets, shard)
        real = logits[:, : shard.valid]  # a view: padded columns are never read
        z_target = torch.zeros(n, dtype=cd, device=logits.device)
        if shard.valid > 0:  # a rank may hold only padding
            picked = real.gather(1, cols.unsqueeze(-1)).squeeze(-1).to(cd) * inv_tau
            z_target = torch.where(owned, picked, z_target)
        m = torch.full((n,), float("-inf"), dtype=cd, device=logits.device)
        s = torch.zeros(n, dtype=cd, device=logits.device)
        w = torch.zeros(n, dtype=cd, device=logits.device)
        if shard.valid > 0:
            rows = max(1, min(n, chunk_rows(shard.valid, logits.device.type, chunk_size)))
            bufs = torch.empty(2, rows * shard.valid, dtype=cd, device=logits.device)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                z, e = scratch(bufs[0], r1 - r0, shard.valid), scratch(bufs[1], r1 - r0, shard.valid)
                x = real[r0:r1]
                # max of z = x / tau is max(x) / tau (tau > 0); z - m = x / tau - m in one pass into the
                # scratch chunk (the caller's logits are never written).
                m_c = x.amax(dim=-1).to(cd) * inv_tau
                torch.add(-m_c.unsqueeze(-1), x, alpha=inv_tau, out=z)
                m[r0:r1] = m_c
                s[r0:r1], w[r0:r1] = shifted_stats(z, e)
            del bufs
        if tp_group is not None:
            m, s, w, z_target = allreduce_stats(m, s, w, z_target, tp_group)
        logp, ent, lse, _ = finish_stats(m, s, w, z_target)
        ctx.save_for_backward(logits, cols, owned, lse, ent)
        ctx.shard, ctx.chunk_size, ctx.inv_tau = shard, chunk_size, inv_tau
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_H):
        logits, cols, owned, lse, ent = ctx.saved_tensors
        shard, inv_tau = ctx.shard, ctx.inv_tau
        if g_lp is None and g_H is None:
            return None, None, None, None, None, None
        n = logits.shape[0]
        a, b, c = grad_coefficients(g_lp, g_H, ent, inv_tau, lse)
        grad = torch.empty_like(logits)
        grad[:, shard.valid :] = 0
        if shard.valid > 0:
            rows = max(1, min(n, chunk_rows(shard.valid, logits.device.type, ctx.chunk_size)))
            real, grad_real = logits[:, : shard.valid], grad[:, : shard.valid]
            # fp32/fp64 logits: the gradient chunk itself holds log p, then dL/dx (no copy at the end).
            in_place = logits.dtype == lse.dtype
            n_bufs = 1 if in_place else 2
            bufs = torch.empty(n_bufs, rows * shard.valid, dtype=lse.dtype, device=logits.device)
            neg_lse = -lse.unsqueeze(-1)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                p = scratch(bufs[0], r1 - r0, shard.valid)
                logp = grad_real[r0:r1] if in_place else scratch(bufs[1], r1 - r0, shard.valid)
                torch.add(neg_lse[r0:r1], real[r0:r1], alpha=inv_tau, out=logp)  # log p = x / tau - lse
                gb = None if b is None else b[r0:r1]
                g = grad_from_logp_(logp, p, a[r0:r1], gb, c[r0:r1], cols[r0:r1], owned[r0:r1])
                if not in_place:
                    grad_real[r0:r1].copy_(g)
            del bufs
        return grad, None, None, None, None, None


def token_logprobs_and_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    tp_group: Any = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Log-probability of each target token and the full-vocabulary entropy, under softmax(logits / tau).

    This is log pi_theta(y_t) and H_t of T1 (arXiv 2501.11651, Sec. 3: the entropy bonus and the KL to the
    anchor are taken under the sampling distribution, logits / rollout temperature). A custom autograd
    function works on ``chunk_size`` rows at a time: apart from the returned gradient (shaped like
    ``logits``) no [T, V] tensor is allocated in forward or backward, and without grad the extra memory
    is a few chunks. ``logits`` is never modified.

    Args:
        logits: [..., V_local] float (bf16/fp16/fp32/fp64) logits; the local vocabulary shard of this rank
            when ``tp_group`` is given (shard r holds global ids [r * V_local, (r + 1) * V_local)).
            Leading dimensions must flatten without a copy (Megatron's [s, b, V] output does; transpose
            the targets to [s, b] rather than the logits to [b, s]).
        targets: [...] int64 global token ids (the sampled tokens).
        tp_group: tensor-parallel process group whose ranks hold the other vocabulary shards, or None.
        vocab_size: real vocabulary size; columns with global id >= vocab_size (TP padding) are masked
            out. None: every column is a real token.
        chunk_size: rows (tokens) per chunk; None picks about 1M (CPU) / 16M (GPU) logits per chunk.
        temperature: tau > 0; the distribution is softmax(logits / tau).

    Returns:
        (logprobs, entropy): two [...] tensors, float32 (float64 for float64 logits), differentiable with
        respect to ``logits``. With a TP group both are identical on every rank, and each rank's
        gradient is that of its own shard (no reduction is needed in backward).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
    try:  # a view, not reshape: a silent [T, V] copy would defeat the point of this function
        x2 = logits.view(-1, logits.shape[-1])
    except RuntimeError:
        raise ValueError(
            f"logits {tuple(logits.shape)} with strides {logits.stride()} cannot be flattened "
            "without a copy; pass them in their stored layout (e.g. [s, b, V]) with matching targets"
        ) from None
    logp, ent = _TokenLogprobEntropy.apply(
        x2, targets.reshape(-1), tp_group, vocab_size, chunk_size, float(temperature)
    )
    return logp.view(targets.shape), ent.view(targets.shape)
