"""The dynamic anchor of T1 (arXiv 2501.11651, Sec. 3): schedule and in-place update, on lists of tensors.

The anchor pi_ref is not the frozen SFT model: after every optimizer step it either moves towards the
policy as an exponential moving average (the ICML version),

    theta_ref <- a * theta_ref + (1 - a) * theta          (``anchor.ema`` = a),

or is replaced by a copy of the policy every N steps (arXiv v1; ``anchor.reset_every`` = N). The two are
exclusive; with neither the anchor stays the initial policy (a frozen reference, for ablations).

This module is pure torch on lists of tensors (the anchor's shards and the matching policy shards, in the
same order); ``megatron_t1.mcore.anchor_store`` owns the weights and calls it. An EMA anchor must be fp32
(or wider): in bf16, (1 - a) * (theta - theta_ref) is below half an ulp of theta_ref for most weights at
a = 0.99 and the anchor would never move. The policy may be any floating dtype and live on another device
(CPU offload): it is converted bucket by bucket, so the extra memory is one bucket, not a copy of the
model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor

from megatron_t1.rl.config import AnchorConfig

__all__ = ["AnchorAction", "anchor_action", "copy_into_", "ema_update_", "update_anchor_"]

AnchorAction = Literal["ema", "reset", "none"]

# Elements of policy converted to the anchor's dtype/device at a time (256 MiB in fp32).
_BUCKET_NUMEL = 1 << 26


def anchor_action(step: int, *, ema: float | None = None, reset_every: int | None = None) -> AnchorAction:
    """What to do to the anchor after optimizer step ``step`` (1 after the first step).

    Returns "ema" (every step when ``ema`` is set), "reset" (when ``step`` is a multiple of
    ``reset_every``) or "none".
    """
    if ema is not None and reset_every is not None:
        raise ValueError(f"anchor ema ({ema}) and reset_every ({reset_every}) are exclusive")
    if step < 1:
        raise ValueError(f"step counts completed optimizer steps and must be >= 1, got {step}")
    if ema is not None:
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"anchor ema must be in [0, 1), got {ema}")
        return "ema"
    if reset_every is not None:
        if reset_every < 1:
            raise ValueError(f"anchor reset_every must be >= 1, got {reset_every}")
        return "reset" if step % reset_every == 0 else "none"
    return "none"


def _check_pairs(anchor: Sequence[Tensor], policy: Sequence[Tensor]) -> None:
    if len(anchor) != len(policy):
        raise ValueError(f"anchor has {len(anchor)} tensors, policy {len(policy)}")
    for i, (a, p) in enumerate(zip(anchor, policy)):
        if a.shape != p.shape:
            raise ValueError(f"tensor {i}: anchor shape {tuple(a.shape)} != policy shape {tuple(p.shape)}")


def _buckets(
    anchor: Sequence[Tensor], policy: Sequence[Tensor], bucket_numel: int
) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """(anchor tensors, policy tensors converted to the anchor's dtype and device), a bucket at a time."""
    dst: list[Tensor] = []
    src: list[Tensor] = []
    size = 0
    for a, p in zip(anchor, policy):
        dst.append(a)
        src.append(p.detach().to(device=a.device, dtype=a.dtype))  # no copy when they already match
        size += a.numel()
        if size >= bucket_numel:
            yield dst, src
            dst, src, size = [], [], 0
    if dst:
        yield dst, src


@torch.no_grad()
def copy_into_(anchor: Sequence[Tensor], policy: Sequence[Tensor]) -> None:
    """Reset: theta_ref <- theta, in place, tensor by tensor (any dtypes and devices)."""
    _check_pairs(anchor, policy)
    torch._foreach_copy_(list(anchor), [p.detach() for p in policy])


@torch.no_grad()
def ema_update_(
    anchor: Sequence[Tensor], policy: Sequence[Tensor], *, decay: float, bucket_numel: int = _BUCKET_NUMEL
) -> None:
    """EMA: theta_ref <- a * theta_ref + (1 - a) * theta in place, a = ``decay`` in [0, 1).

    Computed as theta_ref + (1 - a)(theta - theta_ref) (``torch._foreach_lerp_``), which is exact at a = 0
    (a copy) and does not round theta_ref when theta equals it. ``anchor`` must be fp32 or fp64.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    _check_pairs(anchor, policy)
    for i, a in enumerate(anchor):
        if a.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"anchor tensor {i} is {a.dtype}: an EMA anchor must be fp32 (in bf16/fp16 the update "
                f"(1 - a) * (theta - theta_ref) is mostly below half an ulp and the anchor never moves)"
            )
    for dst, src in _buckets(anchor, policy, bucket_numel):
        torch._foreach_lerp_(dst, src, 1.0 - decay)


def update_anchor_(
    anchor: Sequence[Tensor],
    policy: Sequence[Tensor],
    *,
    step: int,
    ema: float | None = None,
    reset_every: int | None = None,
    config: AnchorConfig | None = None,
) -> AnchorAction:
    """Apply the anchor schedule after optimizer step ``step`` (>= 1); returns the action taken.

    Give either ``config`` (an ``AnchorConfig``) or ``ema`` / ``reset_every``; neither means a frozen
    anchor. ``anchor`` and ``policy`` are matching lists of tensors (same order and shapes).
    """
    if config is not None:
        if ema is not None or reset_every is not None:
            raise ValueError("pass either config or ema/reset_every, not both")
        ema, reset_every = config.ema, config.reset_every
    action = anchor_action(step, ema=ema, reset_every=reset_every)
    if action == "ema":
        ema_update_(anchor, policy, decay=ema)
    elif action == "reset":
        copy_into_(anchor, policy)
    return action
