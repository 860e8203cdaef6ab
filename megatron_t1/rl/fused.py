"""Fused output layer: token log-prob and entropy straight from hidden states, never building [T, V] logits.

logits = hidden @ weight^T is computed one tile [C rows, Vb vocabulary columns] at a time; each tile's
(m, s, w) statistics are merged across tiles (and across TP ranks) exactly as in
``megatron_t1.rl.logprobs`` (see its docstring for the math). Backward recomputes each tile's logits from
the saved per-token lse and entropy, turns them into dL/dlogits for the tile, and accumulates

    dL/dhidden[rows] += dL/dlogits_tile @ weight[cols],  dL/dweight[cols] += dL/dlogits_tile^T @ hidden[rows].

Tiling over both tokens and vocabulary (not rows of the full vocabulary) keeps every matmul large and the
weight gradient is read and written once per row block rather than once per small chunk.

Tensor parallelism (Megatron's vocab-parallel output layer): ``hidden`` [T, H] is replicated on the ranks
of ``tp_group`` and ``weight`` is the local shard [V_local, H]. The forward all-reduces the statistics,
and the backward all-reduces dL/dhidden (what ``copy_to_tensor_model_parallel_region`` does in front of
Megatron's ColumnParallelLinear): the caller must not add that region again. With sequence parallelism
the caller gathers ``hidden`` with ``gather_from_sequence_parallel_region``, whose backward
reduce-scatters (sums) the gradient already: pass ``reduce_hidden_grad=False`` then.

Memory: no [T, V] tensor in forward or backward. Extra memory is two [C, Vb] fp32 tiles, plus, for bf16/
fp16 inputs only, fp32 accumulators for the two gradients (so that the sum over many tiles is not
rounded to bf16 at every step; the result is returned in the input's dtype).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_t1.rl.chunks import tile_shape
from megatron_t1.rl.logprobs import (
    allreduce_stats,
    compute_dtype,
    finish_stats,
    grad_coefficients,
    grad_from_logp_,
    merge_stats,
    scratch,
    target_columns,
    tile_stats_,
    vocab_shard,
)

__all__ = ["fused_token_logprobs_and_entropy"]


def _tile_logits(h: Tensor, w: Tensor, out: Tensor, inv_tau: float, shift: Tensor | None = None) -> Tensor:
    """z = (h @ w^T) / tau - shift written into ``out`` [C, Vb] (matmul in the inputs' dtype).

    ``shift`` [C] (optional) is subtracted from every row. For fp32/fp64 inputs scale and shift ride along
    in the GEMM (addmm's alpha and input) instead of costing separate passes over the tile.
    """
    if out.dtype == h.dtype:
        if shift is None:
            torch.addmm(out, h, w.t(), beta=0.0, alpha=inv_tau, out=out)
        else:
            torch.addmm(-shift.unsqueeze(-1), h, w.t(), alpha=inv_tau, out=out)
        return out
    out.copy_(h @ w.t())
    if inv_tau != 1.0:
        out.mul_(inv_tau)
    if shift is not None:
        out.sub_(shift.unsqueeze(-1))
    return out


class _FusedLinearLogprobEntropy(torch.autograd.Function):
    """(log pi(y), H) of logits = hidden [N, H] @ weight [V_local, H]^T, tiled; see the module docstring."""

    @staticmethod
    def forward(
        ctx, hidden, weight, targets, tp_group, vocab_size, chunk_size, vocab_chunk, temperature, reduce_h
    ):
        n = hidden.shape[0]
        shard = vocab_shard(weight.shape[0], tp_group, vocab_size)
        cd = compute_dtype(hidden.dtype)
        inv_tau = 1.0 / temperature
        cols, owned = target_columns(targets, shard)
        m = torch.full((n,), float("-inf"), dtype=cd, device=hidden.device)
        s = torch.zeros(n, dtype=cd, device=hidden.device)
        w = torch.zeros(n, dtype=cd, device=hidden.device)
        z_target = torch.zeros(n, dtype=cd, device=hidden.device)
        rows, vb = tile_shape(n, shard.valid, hidden.device.type, chunk_size, vocab_chunk)
        # Two reusable [rows, vb] scratch tiles (fresh allocations per tile cost page faults on CPU).
        bufs = torch.empty(2, rows * vb if shard.valid > 0 else 0, dtype=cd, device=hidden.device)
        if shard.valid > 0:
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                h = hidden[r0:r1]
                stats = None
                for v0 in range(0, shard.valid, vb):
                    v1 = min(shard.valid, v0 + vb)
                    z = _tile_logits(h, weight[v0:v1], scratch(bufs[0], r1 - r0, v1 - v0), inv_tau)
                    in_tile = owned[r0:r1] & (cols[r0:r1] >= v0) & (cols[r0:r1] < v1)
                    picked = z.gather(1, (cols[r0:r1] - v0).clamp(0, v1 - v0 - 1).unsqueeze(-1)).squeeze(-1)
                    z_target[r0:r1] += torch.where(in_tile, picked, 0.0)
                    stats = merge_stats(stats, tile_stats_(z, scratch(bufs[1], r1 - r0, v1 - v0)))
                m[r0:r1], s[r0:r1], w[r0:r1] = stats
        del bufs
        if tp_group is not None:
            m, s, w, z_target = allreduce_stats(m, s, w, z_target, tp_group)
        logp, ent, lse, _ = finish_stats(m, s, w, z_target)
        ctx.save_for_backward(hidden, weight, cols, owned, lse, ent)
        ctx.shard, ctx.tile, ctx.inv_tau = shard, (rows, vb), inv_tau
        ctx.reduce_group = tp_group if reduce_h else None
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_H):
        hidden, weight, cols, owned, lse, ent = ctx.saved_tensors
        shard, (rows, vb), inv_tau = ctx.shard, ctx.tile, ctx.inv_tau
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_lp is None and g_H is None) or not (need_h or need_w):
            return (None,) * 9
        n, cd = hidden.shape[0], lse.dtype
        a, b, c = grad_coefficients(g_lp, g_H, ent, inv_tau, lse)
        # Accumulate in the compute dtype; for fp32/fp64 inputs these are the returned gradients themselves.
        grad_h = torch.zeros(hidden.shape, dtype=cd, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_w else None
        bufs = torch.empty(2, rows * vb if shard.valid > 0 else 0, dtype=cd, device=hidden.device)
        for r0 in range(0, n if shard.valid > 0 else 0, rows):
            r1 = min(n, r0 + rows)
            h = hidden[r0:r1]
            gb = None if b is None else b[r0:r1]
            for v0 in range(0, shard.valid, vb):
                v1 = min(shard.valid, v0 + vb)
                tile = scratch(bufs[0], r1 - r0, v1 - v0)
                logp = _tile_logits(h, weight[v0:v1], tile, inv_tau, shift=lse[r0:r1])  # log p
                in_tile = owned[r0:r1] & (cols[r0:r1] >= v0) & (cols[r0:r1] < v1)
                tile_cols = (cols[r0:r1] - v0).clamp(0, v1 - v0 - 1)
                p = scratch(bufs[1], r1 - r0, v1 - v0)
                g = grad_from_logp_(logp, p, a[r0:r1], gb, c[r0:r1], tile_cols, in_tile)
                g_in = g if g.dtype == hidden.dtype else g.to(hidden.dtype)
                if need_h:
                    if grad_h.dtype == hidden.dtype:
                        grad_h[r0:r1].addmm_(g_in, weight[v0:v1])
                    else:
                        grad_h[r0:r1] += (g_in @ weight[v0:v1]).to(cd)
                if need_w:
                    if grad_w.dtype == hidden.dtype:
                        grad_w[v0:v1].addmm_(g_in.t(), h)
                    else:
                        grad_w[v0:v1] += (g_in.t() @ h).to(cd)
                del g_in
        del bufs
        if need_h and ctx.reduce_group is not None:
            # hidden is replicated across the TP ranks: its gradient is the sum of every shard's part.
            dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=ctx.reduce_group)
        if need_h and grad_h.dtype != hidden.dtype:
            grad_h = grad_h.to(hidden.dtype)
        if need_w and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


def fused_token_logprobs_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    tp_group: Any = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    temperature: float = 1.0,
    reduce_hidden_grad: bool = True,
) -> tuple[Tensor, Tensor]:
    """Log pi(target) and full-vocabulary entropy of softmax(hidden @ weight^T / tau), logits never built.

    Same result as ``token_logprobs_and_entropy(hidden @ weight.T, targets, ...)`` (T1, arXiv 2501.11651,
    Sec. 3: entropy bonus and anchor KL under the sampling distribution), with the output layer's matmul
    fused into the tiles: memory beyond the inputs and their gradients is a few [chunk, Vb] tiles.

    Args:
        hidden: [..., H] final hidden states (after the final norm), replicated across ``tp_group``.
        weight: [V_local, H] output-layer weight (this rank's vocabulary shard: global ids
            [rank * V_local, (rank + 1) * V_local)). Same dtype as ``hidden``.
        targets: [...] int64 global token ids.
        tp_group: tensor-parallel group holding the other vocabulary shards, or None. The gradient of
            ``hidden`` is all-reduced over it in backward.
        vocab_size: real vocabulary size; padded ids >= vocab_size are masked out. None: no padding.
        chunk_size: tokens per tile; None picks a square-ish tile of about 0.5M (CPU) / 16M (GPU) logits.
        vocab_chunk_size: vocabulary columns per tile; None: the rest of that budget.
        temperature: tau > 0.
        reduce_hidden_grad: all-reduce dL/dhidden over ``tp_group`` in backward (False: return this
            rank's partial sum, for an input region that sums it itself, e.g. sequence parallelism).

    Returns:
        (logprobs, entropy): [...] float32 (float64 for float64 inputs), differentiable with respect to
        ``hidden`` and ``weight``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [V_local, {hidden.shape[-1]}]")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match")
    logp, ent = _FusedLinearLogprobEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        targets.reshape(-1),
        tp_group,
        vocab_size,
        chunk_size,
        vocab_chunk_size,
        float(temperature),
        reduce_hidden_grad,
    )
    return logp.view(targets.shape), ent.view(targets.shape)
