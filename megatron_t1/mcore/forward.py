"""Forward steps for Megatron's schedule: ``forward_step(data_iterator, model) -> (output, loss_fn)``.

A micro-batch is a dict of tensors on the model's device:
  tokens [b, s] int64, labels [b, s] int64 (next tokens), loss_mask [b, s] float (1 = counts),
  position_ids [b, s] int64, attention_mask [b, 1, s, s] bool (True = masked out) or None (causal).
Packed rows carry a block-diagonal causal mask; RoPE only sees relative positions inside a
document, so positions that run on across documents give the same attention scores.
"""

from __future__ import annotations

from functools import partial

import torch


def sft_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Token-sum cross-entropy of one micro-batch (Megatron per-token contract).

    per_token_loss: [b, s] float (Megatron's vocab-parallel CE of the labels); loss_mask: [b, s].
    Returns (loss_sum, num_tokens, {"loss": [sum, count]}).
    """
    mask = loss_mask.to(torch.float32)
    loss_sum = (per_token_loss.float() * mask).sum()
    count = mask.sum()
    return loss_sum, count.to(torch.int), {"loss": torch.stack([loss_sum.detach(), count])}


def sft_forward_step(data_iterator, model):
    """Next micro-batch through the model chunk; the last stage returns per-token CE."""
    batch = next(data_iterator)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        batch.get("attention_mask"),
        labels=batch["labels"],
    )
    return output, partial(sft_loss, batch["loss_mask"])


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
