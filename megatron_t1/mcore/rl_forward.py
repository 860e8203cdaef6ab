"""RL forward steps on Megatron-Core: the T1 loss and log-prob-only passes (policy or anchor).

A micro-batch holds responses laid out as rows (or packed rows) of tokens:
  tokens [b, s], labels [b, s] (next token = the sampled token at each response position),
  loss_mask [b, s] (1 on response tokens, EOS included), position_ids [b, s],
  attention_mask [b, 1, s, s] bool or None, advantages [b, s] (A_i broadcast to its tokens),
  anchor_logprobs [b, s] (optional), rollout_logprobs [b, s] (optional), old_logprobs [b, s] (optional).

Log-probs and entropy are those of softmax(logits / tau), tau = the rollout temperature, computed
vocab-parallel (:func:`megatron_t1.rl.logprobs.token_logprobs_and_entropy`) on the local logits
shard, with the TP-padding rows masked out.

Megatron's per-token contract: the loss function returns ``(loss_sum, num_tokens, metrics)`` and
the step divides gradients by the global token count. :func:`megatron_t1.rl.objective.t1_loss` is
already normalised by the global count G (any aggregation), so the loss function hands Megatron
``loss * G`` and this micro-batch's token count: the counts add up to G over micro-batches and DP
ranks and the division restores exactly ``t1_loss``'s value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import partial

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_t1.mcore.model import unwrap
from megatron_t1.rl.config import LossConfig
from megatron_t1.rl.fused import fused_token_logprobs_and_entropy
from megatron_t1.rl.logprobs import token_logprobs_and_entropy
from megatron_t1.rl.objective import t1_loss


def _tp_group():
    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


@contextlib.contextmanager
def hidden_states_instead_of_logits(model: torch.nn.Module):
    """Make the last stage's forward return the final hidden states [b, s, H] instead of logits.

    For ``loss.fused_output_layer``: the output layer's matmul moves into the fused log-prob /
    entropy function, so [T, V_local] logits never exist. The output layer's ``forward`` is replaced
    on the instance for the duration and records the weight it would have used (the embedding when
    tied) in the yielded dict under "weight".
    """
    gpt = unwrap(model)
    box: dict = {}
    if not gpt.post_process:
        yield box
        return
    layer = gpt.output_layer

    def forward(input_, weight=None, runtime_gather_output=None):
        box["weight"] = weight if weight is not None else layer.weight
        return input_, None

    layer.forward = forward
    try:
        yield box
    finally:
        del layer.forward


def rl_loss_func(
    batch: dict,
    logits: torch.Tensor,
    *,
    loss_config: LossConfig,
    temperature: float,
    vocab_size: int,
    global_num_tokens: int,
    global_num_seqs: int | None,
    output_weight: torch.Tensor | None = None,
):
    """T1 loss of one micro-batch from its vocab-parallel logits [b, s, V_local], or, with
    ``output_weight`` (the fused output layer), from the final hidden states [b, s, H]."""
    if output_weight is not None:
        logp, ent = fused_token_logprobs_and_entropy(
            logits.to(output_weight.dtype),
            output_weight,
            batch["labels"],
            tp_group=_tp_group(),
            vocab_size=vocab_size,
            chunk_size=loss_config.chunk_size,
            temperature=temperature,
        )
    else:
        logp, ent = token_logprobs_and_entropy(
            logits,
            batch["labels"],
            tp_group=_tp_group(),
            vocab_size=vocab_size,
            chunk_size=loss_config.chunk_size,
            temperature=temperature,
        )
    out = t1_loss(
        logp,
        ent,
        batch["advantages"],
        batch["loss_mask"],
        global_num_tokens=global_num_tokens,
        global_num_seqs=global_num_seqs,
        seq_ids=batch.get("seq_ids"),
        old_logprobs=batch.get("old_logprobs"),
        anchor_logprobs=batch.get("anchor_logprobs"),
        rollout_logprobs=batch.get("rollout_logprobs"),
        config=loss_config,
    )
    count = batch["loss_mask"].sum()
    # Metrics of t1_loss are sums / G: as [sum, count] pairs with count = this share of G, the
    # step's reduction (sum over micro-batches and DP, then divide) returns the global value.
    share = count / global_num_tokens
    metrics = {k: torch.stack([v.detach().float(), share.float()]) for k, v in out.metrics.items()}
    metrics["loss"] = torch.stack([out.loss.detach().float(), share.float()])
    return out.loss * global_num_tokens, count.to(torch.int), metrics


def rl_forward_step(data_iterator, model, **loss_kw):
    """``forward_step`` for :func:`megatron_t1.mcore.train_step.train_step` with the T1 loss
    (through the fused output layer when ``loss_config.fused_output_layer``)."""
    batch = next(data_iterator)
    if loss_kw["loss_config"].fused_output_layer:
        with hidden_states_instead_of_logits(model) as box:
            hidden = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        if "weight" in box:
            return hidden, partial(rl_loss_func, batch, output_weight=box["weight"], **loss_kw)
        return hidden, partial(rl_loss_func, batch, **loss_kw)  # not the last stage: no loss here
    logits = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
    return logits, partial(rl_loss_func, batch, **loss_kw)


def _logprob_loss_func(batch: dict, logits: torch.Tensor, *, temperature: float, vocab_size: int, chunk):
    with torch.no_grad():
        logp, ent = token_logprobs_and_entropy(
            logits,
            batch["labels"],
            tp_group=_tp_group(),
            vocab_size=vocab_size,
            chunk_size=chunk,
            temperature=temperature,
        )
    zero = logits.new_zeros(())
    return zero, torch.zeros((), dtype=torch.int), {"logprobs": logp, "entropy": ent}


def _logprob_forward_step(data_iterator, model, **kw):
    batch = next(data_iterator)
    logits = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
    return logits, partial(_logprob_loss_func, batch, **kw)


@torch.no_grad()
def compute_logprobs(
    chunks: Sequence[torch.nn.Module],
    microbatches: Sequence[dict],
    *,
    temperature: float,
    vocab_size: int,
    seq_length: int,
    micro_batch_size: int,
    chunk_size: int | None = None,
) -> list[dict[str, torch.Tensor]] | None:
    """Per-token ``logprobs`` and ``entropy`` [b, s] of every micro-batch under softmax(logits / tau).

    Runs Megatron's schedule forward-only (any TP/PP). Returns the list on the last pipeline stage
    and None elsewhere. Wrap in :meth:`AnchorStore.swapped_in` for the anchor's pass.
    """
    fb = get_forward_backward_func()
    outputs = fb(
        forward_step_func=partial(
            _logprob_forward_step, temperature=temperature, vocab_size=vocab_size, chunk=chunk_size
        ),
        data_iterator=iter(microbatches) if len(chunks) == 1 else [iter(microbatches) for _ in chunks],
        model=list(chunks),
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=True,
    )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return list(outputs)
