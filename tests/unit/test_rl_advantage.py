"""T1 advantages: shaped reward, RLOO baseline, the KL-centring identity, GRPO."""

from __future__ import annotations

import pytest
import torch

from megatron_t1.rl.advantage import grpo_advantages, t1_advantages
from megatron_t1.rl.config import LossConfig


def _group(p=4, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(-1, 2, (p, k), generator=g).double()
    kl = torch.rand(p, k, generator=g, dtype=torch.float64) * 40 - 5
    return rewards, kl


def test_rloo_matches_leave_one_out_loop():
    rewards, kl = _group()
    beta = 2e-2
    adv = t1_advantages(rewards, kl, beta=beta)
    p, k = rewards.shape
    for i in range(p):
        s = [float(rewards[i, j] - beta * kl[i, j]) for j in range(k)]
        for j in range(k):
            baseline = sum(s[m] for m in range(k) if m != j) / (k - 1)
            assert adv[i, j].item() == pytest.approx(s[j] - baseline, abs=1e-12)


def test_kl_centring_identity():
    # A_i = c (r_i - mean r) - beta c (KL_i - mean KL), c = K / (K - 1): centring KL first only rescales.
    rewards, kl = _group(k=5, seed=1)
    beta, k = 2e-4, 5
    c = k / (k - 1)
    expected = c * (rewards - rewards.mean(1, keepdim=True)) - beta * c * (kl - kl.mean(1, keepdim=True))
    torch.testing.assert_close(t1_advantages(rewards, kl, beta=beta), expected, atol=1e-12, rtol=0)
    centred = kl - kl.mean(1, keepdim=True)
    torch.testing.assert_close(t1_advantages(rewards, centred, beta=beta), expected, atol=1e-12, rtol=0)


def test_closed_forms_and_config_defaults():
    # One correct of four, no KL: A = 1 - 0 = 1 for it, 0 - 1/3 for the others.
    adv = t1_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), None, beta=1.0)
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1 / 3, -1 / 3, -1 / 3]]))
    # beta and method default to LossConfig (beta = 2e-4, rloo).
    rewards, kl = _group(seed=2)
    torch.testing.assert_close(t1_advantages(rewards, kl), t1_advantages(rewards, kl, beta=2e-4))
    grpo_cfg = LossConfig(advantage="grpo", kl_coef=0.1)
    torch.testing.assert_close(
        t1_advantages(rewards, kl, config=grpo_cfg), t1_advantages(rewards, kl, beta=0.1, method="grpo")
    )


def test_grpo_against_reference_and_flat_groups():
    rewards, kl = _group(seed=3)
    s = rewards - 0.01 * kl
    mean = s.mean(1, keepdim=True)
    std = ((s - mean).square().sum(1, keepdim=True) / (s.shape[1] - 1)).sqrt()
    torch.testing.assert_close(
        t1_advantages(rewards, kl, beta=0.01, method="grpo"), (s - mean) / (std + 1e-6)
    )
    assert torch.equal(grpo_advantages(torch.full((2, 4), 0.5)), torch.zeros(2, 4))


def test_k_equals_one_is_a_clear_error():
    for method in ("rloo", "grpo"):
        with pytest.raises(ValueError, match="K >= 2"):
            t1_advantages(torch.ones(3, 1), None, beta=0.0, method=method)
    with pytest.raises(ValueError, match="must match"):
        t1_advantages(torch.ones(3, 4), torch.ones(3, 5), beta=0.1)
