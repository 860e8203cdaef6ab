"""Config sections ``loss`` and ``anchor`` of the T1 objective (arXiv 2501.11651, Sec. 3).

Plain dataclasses (int/float/bool/str, ``Literal`` choices, ``Optional``) with a docstring under every
field and validation in ``__post_init__`` whose messages name the field. ``megatron_t1.config``
re-exports both classes and builds them from YAML; the functions of ``megatron_t1.rl`` accept an
instance through their ``config=`` keyword. Errors are ``ValueError`` (this module must not import
``megatron_t1.config``, which imports it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["AnchorConfig", "LossConfig"]


def _check_number(section: str, name: str, value: object) -> float:
    """``value`` as a float, or a ValueError naming ``section.name`` (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{section}.{name} must be a finite number, got {value!r}")
    return float(value)


def _check_choice(section: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{section}.{name} must be one of {list(choices)}, got {value!r}")


def _check_int(section: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{section}.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class LossConfig:
    """The T1 RL loss: policy gradient with an RLOO advantage, entropy bonus, KL to the anchor.

    L = -agg_t[A_i * log pi_theta(y_t)] - entropy_coef * agg_t[H_t] (+ kl_coef * agg_t[k(t)] when
    ``kl_in == "loss"``), with log-probs and entropy of the tempered sampling distribution.
    """

    kl_coef: float = 2e-4
    """beta: weight of KL(pi_theta || pi_anchor), in the shaped reward s_i = r_i - beta * KL_i (T1 paper:
    2e-4) or, with ``kl_in: loss``, of the per-token KL loss term. >= 0."""
    entropy_coef: float = 1e-3
    """alpha_H: weight of the entropy bonus -alpha_H * H (full-vocabulary entropy). Not published; >= 0."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token estimator of KL(pi_theta || pi_anchor): k1 = log r, k2 = (log r)^2 / 2,
    k3 = 1/r - 1 + log r, with r = pi_theta / pi_anchor. Only the unbiased k1 may go into the reward."""
    kl_in: Literal["reward", "loss"] = "reward"
    """Where the KL enters: the shaped reward (T1) or an explicit loss term (ablation)."""
    kl_reduce: Literal["sum", "mean"] = "sum"
    """Per-response KL_i in the reward: sum over its response tokens, or their mean."""
    aggregation: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    """How per-token loss terms become one number: mean over all response tokens of the global batch, or
    the mean over responses of each response's token mean."""
    advantage: Literal["rloo", "grpo"] = "rloo"
    """RLOO: A_i = s_i - mean_{j != i} s_j (T1). GRPO: (s_i - mean s) / (std s + eps), for ablations."""
    clip_eps: float = 0.2
    """PPO clip: ratio kept within [1 - clip_eps, 1 + clip_eps_high]. Used only when
    ``optim_steps_per_batch > 1`` (one step per rollout batch is on-policy, ratio = 1). In (0, 1)."""
    clip_eps_high: float | None = None
    """Upper clip range (None: same as ``clip_eps``; DAPO's clip-higher uses e.g. 0.28). > 0."""
    optim_steps_per_batch: int = 1
    """Optimizer steps per rollout batch; > 1 splits the batch and uses the clipped importance ratio."""
    tis_cap: float | None = None
    """Truncated importance sampling against train/rollout mismatch: each token's policy-gradient
    term is weighted by min(pi_trainer(y_t) / pi_rollout(y_t), tis_cap), both at the sampling
    temperature, the trainer's taken before the update (Yao et al. 2025). None: off. >= 1."""
    fused_output_layer: bool = False
    """Compute log-prob and entropy straight from the final hidden states and the output-layer weight,
    chunk by chunk, without materialising the [T, V] logits (``megatron_t1.rl.fused``)."""
    routing_replay: bool = False
    """MoE policies: every trainer forward of a step (policy and anchor log-probs, the update) routes
    each token to the experts the rollout engine routed it to (Megatron-Core's RouterReplay; the
    router's weights still get gradients through the replayed experts' probabilities), so the
    policy being trained is the one that sampled. Implies ``rollout.record_routing``."""
    chunk_size: int | None = None
    """Tokens per chunk of the chunked log-prob / entropy (and per tile of the fused output layer). None:
    automatic, about 1M logits per chunk on CPU (0.5M per fused tile) and 16M on GPU, which keeps the
    extra memory to a few chunks."""

    def __post_init__(self) -> None:
        s = "loss"
        self.kl_coef = _check_number(s, "kl_coef", self.kl_coef)
        self.entropy_coef = _check_number(s, "entropy_coef", self.entropy_coef)
        self.clip_eps = _check_number(s, "clip_eps", self.clip_eps)
        for name in ("kl_coef", "entropy_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{s}.{name} must be >= 0, got {getattr(self, name)}")
        _check_choice(s, "kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        _check_choice(s, "kl_in", self.kl_in, ("reward", "loss"))
        _check_choice(s, "kl_reduce", self.kl_reduce, ("sum", "mean"))
        _check_choice(s, "aggregation", self.aggregation, ("token-mean", "seq-mean-token-mean"))
        _check_choice(s, "advantage", self.advantage, ("rloo", "grpo"))
        if self.kl_in == "reward" and self.kl_estimator != "k1":
            raise ValueError(
                f"loss.kl_estimator={self.kl_estimator!r} with loss.kl_in='reward': only the unbiased k1 may "
                "shape the reward; use kl_estimator: k1, or kl_in: loss for k2/k3"
            )
        if not 0.0 < self.clip_eps < 1.0:
            raise ValueError(f"{s}.clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.clip_eps_high is not None:
            self.clip_eps_high = _check_number(s, "clip_eps_high", self.clip_eps_high)
            if self.clip_eps_high <= 0:
                raise ValueError(f"{s}.clip_eps_high must be > 0, got {self.clip_eps_high}")
        _check_int(s, "optim_steps_per_batch", self.optim_steps_per_batch, 1)
        if self.tis_cap is not None:
            self.tis_cap = _check_number(s, "tis_cap", self.tis_cap)
            if self.tis_cap < 1.0:
                raise ValueError(f"{s}.tis_cap must be >= 1 (or null), got {self.tis_cap}")
        if not isinstance(self.fused_output_layer, bool):
            raise ValueError(f"{s}.fused_output_layer must be true/false, got {self.fused_output_layer!r}")
        if self.chunk_size is not None:
            _check_int(s, "chunk_size", self.chunk_size, 1)
        if not isinstance(self.routing_replay, bool):
            raise ValueError(f"{s}.routing_replay must be true/false, got {self.routing_replay!r}")


@dataclass
class AnchorConfig:
    """The dynamic anchor pi_ref of T1: an EMA of the policy, or a copy of it every N steps.

    Exactly one of ``ema`` and ``reset_every`` is set for a dynamic anchor; with neither, the anchor stays
    the initial policy (the classical frozen reference, for ablations). To choose resets, write
    ``ema: null`` and ``reset_every: 100``.
    """

    ema: float | None = 0.99
    """a in theta_ref <- a * theta_ref + (1 - a) * theta after every optimizer step (T1, ICML version).
    In [0, 1); a = 0 copies the policy every step. The anchor is kept in fp32 (in bf16 the update is
    below half an ulp for most weights and the anchor would never move)."""
    reset_every: int | None = None
    """Copy the policy into the anchor every N optimizer steps (T1, arXiv v1). >= 1; exclusive with
    ``ema``."""
    offload_to_cpu: bool = False
    """Keep the anchor's weights in CPU memory between uses instead of GPU memory."""

    def __post_init__(self) -> None:
        if self.ema is not None and self.reset_every is not None:
            raise ValueError(
                f"anchor.ema ({self.ema}) and anchor.reset_every ({self.reset_every}) are exclusive: set "
                "one of them to null (e.g. ema: null, reset_every: 100)"
            )
        if self.ema is not None:
            self.ema = _check_number("anchor", "ema", self.ema)
            if not 0.0 <= self.ema < 1.0:
                raise ValueError(f"anchor.ema must be in [0, 1), got {self.ema}")
        if self.reset_every is not None:
            _check_int("anchor", "reset_every", self.reset_every, 1)
        if not isinstance(self.offload_to_cpu, bool):
            raise ValueError(f"anchor.offload_to_cpu must be true/false, got {self.offload_to_cpu!r}")
