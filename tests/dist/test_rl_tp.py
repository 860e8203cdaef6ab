"""Vocab-parallel log-prob and entropy on 2 gloo ranks (TP=2) equal the single-process result.

One spawn covers the logits path (values and gradients, a padded vocabulary, a rank holding only padding,
float64 and float32) and the fused output layer (values, the all-reduced hidden gradient and the weight
shard's gradient). Each rank computes the single-process reference on the full tensors itself.
"""

from __future__ import annotations

import pytest

from tests.dist.harness import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(40)]


def _close(a, b, tol, what):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:g}"
    return err


def _ranks_check(rank: int, world: int) -> dict:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from megatron_t1.rl.fused import fused_token_logprobs_and_entropy
    from megatron_t1.rl.logprobs import token_logprobs_and_entropy

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    group = dist.group.WORLD
    errors = {}
    try:
        g = torch.Generator().manual_seed(0)  # same inputs on both ranks
        v_local, n = 7, 6
        cases = [(12, torch.float64, 1e-12), (6, torch.float64, 1e-12), (13, torch.float32, 2e-6)]
        for vocab_size, dtype, tol in cases:  # rank 1 has 5 real ids, none, 6 real ids
            full = (torch.randn(n, world * v_local, generator=g) * 3).to(dtype)
            targets = torch.randint(0, vocab_size, (n,), generator=g)
            g_lp, g_h = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
            kw = dict(vocab_size=vocab_size, chunk_size=4, temperature=1.3)

            x = full.clone().requires_grad_(True)
            lp, ent = token_logprobs_and_entropy(x, targets, **kw)
            (lp * g_lp + ent * g_h).sum().backward()

            cols = slice(rank * v_local, (rank + 1) * v_local)
            xs = full[:, cols].clone().requires_grad_(True)
            lp_tp, ent_tp = token_logprobs_and_entropy(xs, targets, tp_group=group, **kw)
            (lp_tp * g_lp + ent_tp * g_h).sum().backward()
            tag = f"V={vocab_size} {dtype}"
            errors[f"logprob {tag}"] = _close(lp_tp, lp, tol, f"logprob {tag}")
            errors[f"entropy {tag}"] = _close(ent_tp, ent, tol, f"entropy {tag}")
            errors[f"grad {tag}"] = _close(xs.grad, x.grad[:, cols], tol, f"grad {tag}")

        # Fused output layer: hidden replicated, weight split by vocabulary rows.
        hid, vocab_size = 5, 11
        hidden = torch.randn(2, 3, hid, generator=g, dtype=torch.float64)
        weight = torch.randn(world * v_local, hid, generator=g, dtype=torch.float64)
        targets = torch.randint(0, vocab_size, (2, 3), generator=g)
        g_lp, g_h = (
            torch.randn(2, 3, generator=g, dtype=torch.float64),
            torch.randn(2, 3, generator=g, dtype=torch.float64),
        )
        kw = dict(vocab_size=vocab_size, chunk_size=4, vocab_chunk_size=3, temperature=0.9)
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        lp, ent = fused_token_logprobs_and_entropy(h, w, targets, **kw)
        (lp * g_lp + ent * g_h).sum().backward()
        rows = slice(rank * v_local, (rank + 1) * v_local)
        hs, ws = hidden.clone().requires_grad_(True), weight[rows].clone().requires_grad_(True)
        lp_tp, ent_tp = fused_token_logprobs_and_entropy(hs, ws, targets, tp_group=group, **kw)
        (lp_tp * g_lp + ent_tp * g_h).sum().backward()
        errors["fused logprob"] = _close(lp_tp, lp, 1e-12, "fused logprob")
        errors["fused entropy"] = _close(ent_tp, ent, 1e-12, "fused entropy")
        errors["fused grad hidden"] = _close(hs.grad, h.grad, 1e-12, "fused grad hidden")
        errors["fused grad weight"] = _close(ws.grad, w.grad[rows], 1e-12, "fused grad weight")
        # Sequence-parallel callers sum the hidden gradient in their own region: partial sums come back.
        hp = hidden.clone().requires_grad_(True)
        lp_p, ent_p = fused_token_logprobs_and_entropy(
            hp, weight[rows], targets, tp_group=group, reduce_hidden_grad=False, **kw
        )
        (lp_p * g_lp + ent_p * g_h).sum().backward()
        partial = hp.grad.clone()
        dist.all_reduce(partial, group=group)
        errors["fused partial grad hidden"] = _close(partial, h.grad, 1e-12, "fused partial grad hidden")
        assert (hp.grad - h.grad).abs().max() > 1e-3, "reduce_hidden_grad=False must not reduce"
    finally:
        dist.destroy_process_group()
    return errors


def test_vocab_parallel_equals_single_process():
    results = run_ranks(_ranks_check, world=2, timeout=35)
    assert len(results) == 2 and all(len(r) == 14 for r in results)
