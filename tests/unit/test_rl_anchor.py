"""The dynamic anchor: schedule, EMA against a float64 reference, resets, and KL = 0 right after one."""

from __future__ import annotations

import pytest
import torch

from megatron_t1.rl.anchor import anchor_action, copy_into_, ema_update_, update_anchor_
from megatron_t1.rl.config import AnchorConfig
from megatron_t1.rl.kl import response_kl
from megatron_t1.rl.logprobs import token_logprobs_and_entropy


def _params(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=g).to(dtype), torch.randn(7, generator=g).to(dtype)]


def test_schedule():
    assert [anchor_action(s, ema=0.99) for s in (1, 2, 3)] == ["ema"] * 3
    assert [anchor_action(s, reset_every=3) for s in range(1, 7)] == ["none", "none", "reset"] * 2
    assert anchor_action(5) == "none"  # frozen anchor
    with pytest.raises(ValueError, match="exclusive"):
        anchor_action(1, ema=0.9, reset_every=2)
    with pytest.raises(ValueError, match=">= 1"):
        anchor_action(0, ema=0.9)


def test_ema_matches_float64_reference_with_bf16_policy():
    anchor = _params(torch.float32, 0)
    policy = _params(torch.bfloat16, 1)
    expected = [0.9 * a.double() + 0.1 * p.double() for a, p in zip(anchor, policy)]
    ema_update_(anchor, policy, decay=0.9, bucket_numel=4)  # several buckets
    for a, e in zip(anchor, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, atol=1e-6, rtol=1e-6)


def test_ema_with_zero_decay_equals_a_reset():
    policy = _params(torch.bfloat16, 2)
    a_ema, a_reset = _params(torch.float32, 3), _params(torch.float32, 4)
    ema_update_(a_ema, policy, decay=0.0)
    copy_into_(a_reset, policy)
    for x, y, p in zip(a_ema, a_reset, policy):
        assert torch.equal(x, y) and torch.equal(x, p.float())


def test_fp32_anchor_moves_where_bf16_would_not():
    # theta_ref = 1.0, theta = 1.0 + 2^-7 (one bf16 ulp): the a = 0.99 step is 7.8e-5, under half a bf16 ulp.
    ref_bf16 = [torch.ones(4, dtype=torch.bfloat16)]
    policy = [torch.full((4,), 1.0 + 2**-7, dtype=torch.bfloat16)]
    torch._foreach_lerp_(ref_bf16, policy, 0.01)
    assert torch.equal(ref_bf16[0], torch.ones(4, dtype=torch.bfloat16))  # why the anchor is kept in fp32
    ref_fp32 = [torch.ones(4)]
    ema_update_(ref_fp32, policy, decay=0.99)
    assert (ref_fp32[0] > 1.0).all()
    with pytest.raises(ValueError, match="fp32"):
        ema_update_([torch.ones(4, dtype=torch.bfloat16)], policy, decay=0.99)


def test_kl_is_exactly_zero_right_after_a_reset():
    # A tiny bf16 "policy": embedding + output layer. Its anchor is an fp32 copy, cast back for the forward.
    g = torch.Generator().manual_seed(5)
    policy = [torch.randn(11, 8, generator=g).bfloat16(), torch.randn(13, 8, generator=g).bfloat16()]
    anchor = [torch.randn(11, 8, generator=g), torch.randn(13, 8, generator=g)]
    tokens = torch.randint(0, 11, (2, 6), generator=g)
    targets = torch.randint(0, 11, (2, 6), generator=g)

    def logprobs(params):
        emb, out = (p.to(torch.bfloat16) for p in params)
        return token_logprobs_and_entropy(emb[tokens] @ out.t(), targets, vocab_size=11, temperature=1.2)[0]

    assert response_kl(logprobs(policy), logprobs(anchor), torch.ones(2, 6)).abs().sum() > 0
    action = update_anchor_(anchor, policy, step=100, config=AnchorConfig(ema=None, reset_every=100))
    assert action == "reset"
    kl = response_kl(logprobs(policy), logprobs(anchor), torch.ones(2, 6))
    assert torch.equal(kl, torch.zeros(2))


def test_update_anchor_dispatch_and_checks():
    policy = _params(torch.float32, 6)
    anchor = _params(torch.float32, 7)
    before = [a.clone() for a in anchor]
    assert update_anchor_(anchor, policy, step=3, reset_every=4) == "none"
    assert all(torch.equal(a, b) for a, b in zip(anchor, before))
    assert update_anchor_(anchor, policy, step=1, config=AnchorConfig()) == "ema"  # default a = 0.99
    torch.testing.assert_close(anchor[0], 0.99 * before[0] + 0.01 * policy[0])
    with pytest.raises(ValueError, match="either config"):
        update_anchor_(anchor, policy, step=1, config=AnchorConfig(), ema=0.5)
    with pytest.raises(ValueError, match="shape"):
        copy_into_(anchor, policy[::-1])
