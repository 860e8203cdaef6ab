"""t1_loss: against a float64 per-token reference, micro-batch additivity, clipping, metrics."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_t1.rl.config import LossConfig
from megatron_t1.rl.objective import t1_loss


def _batch(s=6, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(s, t, generator=g, dtype=torch.float64) * 4 - 0.05).requires_grad_(True)
    ent = (torch.rand(s, t, generator=g, dtype=torch.float64) * 3 + 0.1).requires_grad_(True)
    adv = (torch.randn(s, 1, generator=g, dtype=torch.float64)).expand(s, t).contiguous()
    mask = torch.zeros(s, t, dtype=torch.float64)
    for i in range(s):  # a prompt part, then a response of random length, then padding
        start = int(torch.randint(0, 3, (), generator=g))
        mask[i, start : start + int(torch.randint(1, t - start + 1, (), generator=g))] = 1
    anchor = lp.detach() + torch.randn(s, t, generator=g, dtype=torch.float64) * 0.3
    old = lp.detach() + torch.randn(s, t, generator=g, dtype=torch.float64) * 0.4
    return lp, ent, adv, mask, anchor, old


def reference_loss(
    lp,
    ent,
    adv,
    mask,
    *,
    aggregation,
    alpha,
    beta=0.0,
    kl_in="reward",
    estimator="k1",
    anchor=None,
    old=None,
    eps=0.2,
    eps_high=None,
):
    """Plain per-token loop in float64 (T1 loss, see megatron_t1/rl/objective.py)."""
    s, t = mask.shape
    n_tok, n_seq = float(mask.sum()), s
    total = 0.0
    for i in range(s):
        n_i = float(mask[i].sum())
        for j in range(t):
            if not mask[i, j]:
                continue
            a, x = adv[i, j], lp[i, j]
            if old is None:
                pg = -a * x
            else:
                r = torch.exp(x - old[i, j])
                hi = eps if eps_high is None else eps_high
                pg = torch.maximum(-a * r, -a * r.clamp(1 - eps, 1 + hi))
            term = pg - alpha * ent[i, j]
            if kl_in == "loss":
                d = float(anchor[i, j]) - x
                k = {"k1": -d, "k2": 0.5 * d**2, "k3": torch.exp(d) - 1 - d}[estimator]
                term = term + beta * k
            weight = 1 / n_tok if aggregation == "token-mean" else 1 / (n_i * n_seq)
            total = total + weight * term
    return total


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("mode", ["on-policy", "clipped", "kl-loss"])
def test_matches_reference_loss_and_gradients(aggregation, mode):
    lp, ent, adv, mask, anchor, old = _batch()
    kw = dict(aggregation=aggregation, entropy_coef=1e-2)
    ref_kw = dict(aggregation=aggregation, alpha=1e-2)
    if mode == "clipped":
        kw |= dict(old_logprobs=old, clip_eps_high=0.28)
        ref_kw |= dict(old=old, eps_high=0.28)
    if mode == "kl-loss":
        kw |= dict(kl_in="loss", kl_estimator="k3", kl_coef=0.5)
        ref_kw |= dict(kl_in="loss", estimator="k3", beta=0.5)
    out = t1_loss(
        lp, ent, adv, mask, global_num_tokens=int(mask.sum()), global_num_seqs=6, anchor_logprobs=anchor, **kw
    )
    ref = reference_loss(lp, ent, adv, mask, anchor=anchor, **ref_kw)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-14)
    g = torch.autograd.grad(out.loss, (lp, ent))
    g_ref = torch.autograd.grad(ref, (lp, ent))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def _split_rows(x, rows):
    return None if x is None else x[rows]


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_batch_loss_is_the_sum_over_micro_batches_padded_and_packed(aggregation):
    lp, ent, adv, mask, anchor, old = _batch(s=6)
    common = dict(
        global_num_tokens=int(mask.sum()),
        global_num_seqs=6,
        aggregation=aggregation,
        kl_in="loss",
        kl_estimator="k2",
        kl_coef=0.1,
    )
    full = t1_loss(lp, ent, adv, mask, anchor_logprobs=anchor, old_logprobs=old, **common)
    parts = []
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
        parts.append(
            t1_loss(
                lp[rows],
                ent[rows],
                adv[rows],
                mask[rows],
                anchor_logprobs=anchor[rows],
                old_logprobs=old[rows],
                **common,
            )
        )
    assert sum(p.loss for p in parts).item() == pytest.approx(full.loss.item(), rel=1e-12)
    for name, value in full.metrics.items():
        assert sum(p.metrics[name] for p in parts).item() == pytest.approx(value.item(), rel=1e-10, abs=1e-14)
    # Packed: the responses of two micro-batches laid end to end (prompt/padding masked), local seq ids.
    packed_total = 0.0
    for rows in (range(0, 2), range(2, 6)):
        cat = lambda x, rows=rows: torch.cat([x[i] for i in rows])  # noqa: E731
        ids = torch.cat([torch.full((mask.shape[1],), k) for k in range(len(rows))])
        packed_total = (
            packed_total
            + t1_loss(
                cat(lp),
                cat(ent),
                cat(adv),
                cat(mask),
                seq_ids=ids,
                anchor_logprobs=cat(anchor),
                old_logprobs=cat(old),
                **common,
            ).loss
        )
    assert packed_total.item() == pytest.approx(full.loss.item(), rel=1e-12)
    g_full = torch.autograd.grad(full.loss, lp)[0]
    g_packed = torch.autograd.grad(packed_total, lp)[0]
    torch.testing.assert_close(g_full, g_packed)


def test_on_policy_ratio_gives_the_same_gradient_and_no_clipping():
    lp, ent, adv, mask, _, _ = _batch(seed=1)
    n = int(mask.sum())
    plain = t1_loss(lp, ent, adv, mask, global_num_tokens=n)
    ratio = t1_loss(lp, ent, adv, mask, global_num_tokens=n, old_logprobs=lp.detach())
    torch.testing.assert_close(torch.autograd.grad(plain.loss, lp)[0], torch.autograd.grad(ratio.loss, lp)[0])
    assert ratio.metrics["clip_frac"].item() == 0.0
    assert ratio.metrics["ratio"].item() == pytest.approx(1.0)


def test_clip_fraction_and_metrics():
    lp, ent, adv, mask, anchor, old = _batch(seed=2)
    n = int(mask.sum())
    rollout = lp.detach() - 0.05
    out = t1_loss(
        lp,
        ent,
        adv,
        mask,
        global_num_tokens=n,
        old_logprobs=old,
        anchor_logprobs=anchor,
        rollout_logprobs=rollout,
    )
    r = torch.exp(lp.detach() - old)
    a = adv
    clipped = (-a * r.clamp(0.8, 1.2)) > (-a * r)
    assert out.metrics["clip_frac"].item() == pytest.approx(float((clipped * mask).sum()) / n)
    d = lp.detach() - anchor
    assert out.metrics["kl_k1"].item() == pytest.approx(float((d * mask).sum()) / n)
    assert out.metrics["kl_k3"].item() == pytest.approx(float(((torch.exp(-d) - 1 + d) * mask).sum()) / n)
    assert out.metrics["mismatch_abs"].item() == pytest.approx(0.05 * float(mask.sum()) / n)
    assert out.metrics["mismatch_kl_k3"].item() == pytest.approx(math.exp(0.05) - 1 - 0.05)
    assert out.metrics["entropy"].item() == pytest.approx(float((ent.detach() * mask).sum()) / n)
    assert out.metrics["num_tokens_frac"].item() == pytest.approx(1.0)
    assert all(not m.requires_grad and m.dim() == 0 for m in out.metrics.values())


def test_config_and_keyword_hyperparameters():
    lp, ent, adv, mask, anchor, _ = _batch(seed=3)
    n = int(mask.sum())
    cfg = LossConfig(entropy_coef=0.3)
    a = t1_loss(lp, ent, adv, mask, global_num_tokens=n, config=cfg).loss
    b = t1_loss(lp, ent, adv, mask, global_num_tokens=n, entropy_coef=0.3).loss
    c = t1_loss(lp, ent, adv, mask, global_num_tokens=n, config=cfg, entropy_coef=0.0).loss
    assert a.item() == b.item() != c.item()
    with pytest.raises(ValueError, match="kl_in='reward'"):
        t1_loss(lp, ent, adv, mask, global_num_tokens=n, kl_estimator="k3")
    with pytest.raises(ValueError, match="anchor_logprobs"):
        t1_loss(lp, ent, adv, mask, global_num_tokens=n, kl_in="loss", kl_estimator="k3")
    with pytest.raises(ValueError, match="global_num_seqs"):
        t1_loss(lp, ent, adv, mask, global_num_tokens=n, aggregation="seq-mean-token-mean")
