"""k1/k2/k3 estimators of KL(pi_theta || pi_anchor) and the per-response reduction."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_t1.rl.kl import kl_estimate, kl_k1, kl_k2, kl_k3, response_kl, sequence_reduce


def _pair(shape=(4, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(shape, generator=g, dtype=torch.float64) * 3, -torch.rand(
        shape, generator=g, dtype=torch.float64
    ) * 3


def test_estimators_match_their_definitions():
    lp, lq = _pair()
    for i in range(lp.numel()):
        a, b = lp.view(-1)[i].item(), lq.view(-1)[i].item()
        r = math.exp(a - b)  # pi_theta / pi_anchor
        assert kl_k1(lp, lq).view(-1)[i].item() == pytest.approx(math.log(r), rel=1e-12, abs=1e-12)
        assert kl_k2(lp, lq).view(-1)[i].item() == pytest.approx(0.5 * math.log(r) ** 2, rel=1e-12, abs=1e-12)
        assert kl_k3(lp, lq).view(-1)[i].item() == pytest.approx(
            1 / r - 1 + math.log(r), rel=1e-10, abs=1e-12
        )
    assert torch.equal(kl_estimate(lp, lq, "k3"), kl_k3(lp, lq))
    assert (kl_k3(lp, lq) >= 0).all() and (kl_k2(lp, lq) >= 0).all()
    assert torch.equal(kl_k3(lp, lp), torch.zeros_like(lp)) and torch.equal(
        kl_k1(lp, lp), torch.zeros_like(lp)
    )
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(lp, lq, "k4")


def test_k1_and_k3_are_unbiased_in_exact_expectation():
    # Exact expectation over a categorical: E_p[k(v)] = sum_v p_v k(v) equals KL(p || q) for k1 and k3.
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(50, generator=g, dtype=torch.float64), 0)
    logq = torch.log_softmax(torch.randn(50, generator=g, dtype=torch.float64), 0)
    p = logp.exp()
    kl = float((p * (logp - logq)).sum())
    assert float((p * kl_k1(logp, logq)).sum()) == pytest.approx(kl, rel=1e-12)
    assert float((p * kl_k3(logp, logq)).sum()) == pytest.approx(kl, rel=1e-12)
    # k2 is biased, but agrees to second order when the distributions are close.
    logq_close = torch.log_softmax(logp + 1e-3 * torch.randn(50, generator=g, dtype=torch.float64), 0)
    kl_close = float((p * (logp - logq_close)).sum())
    assert float((p * kl_k2(logp, logq_close)).sum()) == pytest.approx(kl_close, rel=1e-2)


def test_response_kl_padded_and_packed_layouts():
    lp, lq = _pair((3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float64)
    expected_sum = [sum(lp[i, t] - lq[i, t] for t in range(5) if mask[i, t]) for i in range(3)]
    expected_mean = [s / mask[i].sum() for i, s in enumerate(expected_sum)]
    torch.testing.assert_close(response_kl(lp, lq, mask), torch.stack(expected_sum))
    torch.testing.assert_close(response_kl(lp, lq, mask, reduce="mean"), torch.stack(expected_mean))
    # The same three responses packed into one row, in another order, with padding in between.
    order = [2, 0, 1]
    flat_lp, flat_lq, flat_mask, ids = [], [], [], []
    for new_id, i in enumerate(order):
        keep = mask[i] > 0
        flat_lp += [lp[i][keep], torch.tensor([0.3], dtype=torch.float64)]
        flat_lq += [lq[i][keep], torch.tensor([-0.2], dtype=torch.float64)]
        flat_mask += [torch.ones(int(keep.sum()), dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]
        ids += [torch.full((int(keep.sum()),), new_id), torch.tensor([-1])]
    packed = response_kl(
        torch.cat(flat_lp), torch.cat(flat_lq), torch.cat(flat_mask), seq_ids=torch.cat(ids), num_seqs=3
    )
    torch.testing.assert_close(packed, torch.stack(expected_sum)[order])
    # An empty response reduces to 0, not nan.
    assert sequence_reduce(lp, torch.zeros_like(lp), reduce="mean").eq(0).all()
