"""The per-token pieces of a T1 step, each against a float64 reference written with plain loops:
per-response k1 parts (rl.kl), token advantages (rl.advantage), the train/rollout mismatch and the
truncated importance weights (rl.mismatch)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_t1.rl.advantage import token_advantages
from megatron_t1.rl.kl import finish_response_kl, response_kl_parts
from megatron_t1.rl.mismatch import logprob_mismatch, truncated_is_weights


def _packed(seed: int = 0, shape=(2, 11), n_docs: int = 5):
    """Two packed rows: documents of random lengths, a mask on their 'response' part, padding -1."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(shape, generator=g, dtype=torch.float64) * 4
    la = -torch.rand(shape, generator=g, dtype=torch.float64) * 4
    mu = lp + (torch.rand(shape, generator=g, dtype=torch.float64) - 0.5)
    ids = torch.full(shape, -1, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.float64)
    d = 0
    for r in range(shape[0]):
        o = 0
        while o < shape[1] - 2 and d < n_docs:
            n = int(torch.randint(2, 5, (1,), generator=g))
            n = min(n, shape[1] - o)
            ids[r, o : o + n] = d
            mask[r, o + 1 : o + n] = 1.0  # the first token of a document is its prompt
            o, d = o + n, d + 1
    return lp, la, mu, ids, mask, d


def test_response_kl_parts_match_a_loop_and_ignore_padding():
    lp, la, _, ids, mask, n = _packed()
    lp_bad = lp.clone()
    lp_bad[mask == 0] = float("nan")  # padding and prompt positions never reach a response
    parts = response_kl_parts(lp_bad, la, mask, ids, n)
    for d in range(n):
        ref_sum, ref_n = 0.0, 0
        for r in range(lp.shape[0]):
            for t in range(lp.shape[1]):
                if mask[r, t] > 0 and ids[r, t] == d:
                    ref_sum += lp[r, t].item() - la[r, t].item()
                    ref_n += 1
        assert parts.kl_sum[d].item() == pytest.approx(ref_sum, rel=1e-12, abs=1e-12)
        assert parts.tokens[d].item() == ref_n
    assert parts.kl_sum.dtype == torch.float64
    mean = finish_response_kl(parts.kl_sum, parts.tokens, "mean")
    assert torch.allclose(mean, parts.kl_sum / parts.tokens.clamp(min=1))
    assert torch.equal(finish_response_kl(parts.kl_sum, parts.tokens, "sum"), parts.kl_sum)
    with pytest.raises(ValueError, match="reduce"):
        finish_response_kl(parts.kl_sum, parts.tokens, "max")


def test_kl_parts_add_over_micro_batches():
    lp, la, _, ids, mask, n = _packed(seed=3)
    whole = response_kl_parts(lp, la, mask, ids, n)
    a = response_kl_parts(lp[:1], la[:1], mask[:1], ids[:1], n)
    b = response_kl_parts(lp[1:], la[1:], mask[1:], ids[1:], n)
    assert torch.allclose(a.kl_sum + b.kl_sum, whole.kl_sum, rtol=0, atol=1e-14)
    assert torch.equal(a.tokens + b.tokens, whole.tokens)


def test_token_advantages_broadcast_each_response_value():
    _, _, _, ids, mask, n = _packed(seed=1)
    adv = torch.arange(1, n + 1, dtype=torch.float64) * 0.5
    out = token_advantages(adv, ids, mask)
    for r in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            want = adv[ids[r, t]].item() if mask[r, t] > 0 else 0.0
            assert out[r, t].item() == want


def test_mismatch_matches_a_loop():
    lp, _, mu, _, mask, _ = _packed(seed=2)
    st = logprob_mismatch(lp, mu, mask)
    diffs = [abs(lp[r, t].item() - mu[r, t].item()) for r in range(2) for t in range(11) if mask[r, t] > 0]
    assert st.abs_sum.item() == pytest.approx(math.fsum(diffs), rel=1e-12)
    assert st.count.item() == len(diffs) and st.max.item() == max(diffs)
    empty = logprob_mismatch(lp, mu, torch.zeros_like(mask))
    assert empty.count.item() == 0 and empty.max.item() == 0 and empty.abs_sum.item() == 0


@pytest.mark.parametrize("cap", [0.9, 1.0, 2.0])
def test_truncated_is_weights_match_a_loop(cap):
    lp, _, mu, _, mask, _ = _packed(seed=4)
    tis = truncated_is_weights(lp, mu, mask, cap=cap)
    clipped = total = 0.0
    for r in range(2):
        for t in range(11):
            ratio = math.exp(lp[r, t].item() - mu[r, t].item())
            w = min(ratio, cap)
            assert tis.weights[r, t].item() == pytest.approx(w, rel=1e-12)
            if mask[r, t] > 0:
                clipped += ratio > cap
                total += w
    assert tis.clipped.item() == clipped and tis.weight_sum.item() == pytest.approx(total, rel=1e-12)
    assert (tis.weights <= cap).all()
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(lp, mu, mask, cap=0.0)
