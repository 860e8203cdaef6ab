"""LossConfig / AnchorConfig defaults (T1.md) and validation messages that name the field."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from megatron_t1.rl.config import AnchorConfig, LossConfig


def test_defaults_are_t1s():
    loss, anchor = LossConfig(), AnchorConfig()
    assert (loss.kl_coef, loss.entropy_coef, loss.kl_estimator, loss.kl_in) == (2e-4, 1e-3, "k1", "reward")
    assert loss.aggregation == "token-mean" and loss.advantage == "rloo" and loss.optim_steps_per_batch == 1
    assert (anchor.ema, anchor.reset_every, anchor.offload_to_cpu) == (0.99, None, False)
    for cls in (LossConfig, AnchorConfig):  # every field has a docstring right under it
        lines = [ln.strip() for ln in inspect.getsource(cls).splitlines()]
        for f in dataclasses.fields(cls):
            at = next(i for i, ln in enumerate(lines) if ln.startswith(f"{f.name}: "))
            assert lines[at + 1].startswith('"""'), f.name


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(kl_estimator="k3"), "kl_estimator"),
        (dict(kl_estimator="k5", kl_in="loss"), "kl_estimator"),
        (dict(kl_coef=-1.0), "kl_coef"),
        (dict(entropy_coef=float("nan")), "entropy_coef"),
        (dict(aggregation="sum"), "aggregation"),
        (dict(clip_eps=1.5), "clip_eps"),
        (dict(clip_eps_high=0.0), "clip_eps_high"),
        (dict(optim_steps_per_batch=0), "optim_steps_per_batch"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(advantage="ppo"), "advantage"),
        (dict(kl_reduce="max"), "kl_reduce"),
        (dict(kl_coef=True), "kl_coef"),
    ],
)
def test_loss_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"loss.{field}"):
        LossConfig(**kwargs)


def test_anchor_validation():
    with pytest.raises(ValueError, match=r"anchor.ema .* anchor.reset_every"):
        AnchorConfig(reset_every=100)
    assert AnchorConfig(ema=None, reset_every=100).reset_every == 100
    assert AnchorConfig(ema=None).ema is None  # frozen anchor
    with pytest.raises(ValueError, match="anchor.ema"):
        AnchorConfig(ema=1.0)
    with pytest.raises(ValueError, match="anchor.reset_every"):
        AnchorConfig(ema=None, reset_every=0)
    assert LossConfig(kl_in="loss", kl_estimator="k3", kl_coef=1).kl_coef == 1.0
