"""Forward steps for Megatron's schedule: ``forward_step(data_iterator, model) -> (output, loss_fn)``.

A micro-batch is a dict of tensors (moved to the model's device by :func:`to_device` when the
schedule takes it): tokens [b, s] int64, labels [b, s] int64 (next tokens), loss_mask [b, s] float
(1 = counts), position_ids [b, s] int64, and how packed documents are kept apart
(:mod:`megatron_t1.data.packing`): ``cu_seqlens`` int32 + ``max_seqlen`` int for the THD layout
(b = 1; Megatron's ``PackedSeqParams``, RoPE restarting per document), or ``attention_mask``
[b, 1, s, s] bool (True = masked out), or neither (one causal sequence per row).

:func:`model_forward` is the one place a batch meets the model, and it refuses a layout the
model's core attention would get wrong (:func:`megatron_t1.mcore.model.check_packed_layout`): TE's
attention with a causal mask type does not apply a dense mask, Megatron's unfused attention has no
THD path.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_t1.mcore.model import attention_kind, check_packed_layout, unwrap


def batch_layout(batch: dict) -> str | None:
    """ "thd", "mask", or None (no packing information: plain causal rows)."""
    if batch.get("cu_seqlens") is not None:
        return "thd"
    return "mask" if batch.get("attention_mask") is not None else None


def packed_seq_params(batch: dict) -> PackedSeqParams | None:
    """Megatron's THD description of a packed micro-batch, or None for the other layouts."""
    cu = batch.get("cu_seqlens")
    if cu is None:
        return None
    n = int(batch["max_seqlen"])
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=n, max_seqlen_kv=n
    )


def model_forward(model: torch.nn.Module, batch: dict, **kwargs) -> torch.Tensor:
    """``model(tokens, position_ids, attention_mask, packed_seq_params=...)`` after checking that the
    model's core attention honours the batch's document boundaries."""
    layout = batch_layout(batch)
    if layout is not None:
        check_packed_layout(attention_kind(model), layout)
    return model(
        batch["tokens"],
        batch["position_ids"],
        batch.get("attention_mask"),
        packed_seq_params=packed_seq_params(batch),
        **kwargs,
    )


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
    output = model_forward(model, batch, labels=batch["labels"])
    return output, partial(sft_loss, batch["loss_mask"])


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device`` (other values as they are)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def on_device(microbatches, device: torch.device):
    """Iterate over ``microbatches`` moving each to ``device`` only when the schedule takes it, so a
    step's micro-batches are never all on the device at once."""
    return (to_device(b, device) for b in microbatches)


def schedule_iterators(microbatches, chunks):
    """The ``data_iterator`` argument of Megatron's schedule for ``chunks`` (:func:`on_device` on the
    chunks' device); with virtual pipeline stages every chunk walks the same micro-batches."""
    device = next(unwrap(chunks[0]).parameters()).device
    if len(chunks) == 1:
        return on_device(microbatches, device)
    return [on_device(microbatches, device) for _ in chunks]
