"""RL forward steps on Megatron-Core: the T1 loss and log-prob-only passes (policy or anchor).

A micro-batch holds responses laid out as packed rows of tokens (:mod:`megatron_t1.mcore.forward`
for the layouts: THD ``cu_seqlens`` with b = 1, or a dense mask):
  tokens [b, s], labels [b, s] (next token = the sampled token at each response position),
  loss_mask [b, s] (1 on response tokens, EOS included), position_ids [b, s],
  advantages [b, s] (A_i broadcast to its tokens), anchor_logprobs [b, s] (optional),
  rollout_logprobs [b, s] (optional), old_logprobs [b, s] (optional).

With ``loss.fused_output_layer`` the output layer's matmul runs inside the log-prob / entropy
function (:mod:`megatron_t1.rl.fused`) in the training step *and* in the log-prob passes (policy and
anchor), so no [tokens, V_local] logits exist at all. Under sequence parallelism the final hidden
states arrive split along the sequence ([s/TP, b, H]); :func:`hidden_states_instead_of_logits`
gathers them as the output layer would have (``gather_from_sequence_parallel_region``, whose backward
reduce-scatters the gradient, so the fused function must not all-reduce it again).

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
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from megatron_t1.mcore.forward import model_forward, schedule_iterators
from megatron_t1.mcore.model import unwrap
from megatron_t1.mcore.moe import RouteAgreement, recorded_routing
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
    tied) in the yielded dict under "weight", and under "reduce_hidden_grad" whether the fused
    function must all-reduce the hidden states' gradient over TP (not under SP: the gather's
    backward sums it).
    """
    gpt = unwrap(model)
    box: dict = {}
    if not gpt.post_process:
        yield box
        return
    layer = gpt.output_layer
    sp = gpt.config.sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1

    def forward(input_, weight=None, runtime_gather_output=None):
        box["weight"] = weight if weight is not None else layer.weight
        box["reduce_hidden_grad"] = not sp
        if sp:  # what ColumnParallelLinear does with SP before its matmul
            input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True)
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
    reduce_hidden_grad: bool = True,
):
    """T1 loss of one micro-batch from its vocab-parallel logits [b, s, V_local], or, with
    ``output_weight`` (the fused output layer), from the final hidden states [b, s, H]."""
    logp, ent = _logprobs_and_entropy(
        batch,
        logits,
        temperature=temperature,
        vocab_size=vocab_size,
        chunk_size=loss_config.chunk_size,
        output_weight=output_weight,
        reduce_hidden_grad=reduce_hidden_grad,
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


def _logprobs_and_entropy(
    batch: dict,
    output: torch.Tensor,
    *,
    temperature: float,
    vocab_size: int,
    chunk_size: int | None,
    output_weight: torch.Tensor | None,
    reduce_hidden_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y), H) [b, s] from logits [b, s, V_local], or from hidden states [b, s, H] and the
    output layer's weight (fused)."""
    if output_weight is not None:
        return fused_token_logprobs_and_entropy(
            output.to(output_weight.dtype),
            output_weight,
            batch["labels"],
            tp_group=_tp_group(),
            vocab_size=vocab_size,
            chunk_size=chunk_size,
            temperature=temperature,
            reduce_hidden_grad=reduce_hidden_grad,
        )
    return token_logprobs_and_entropy(
        output,
        batch["labels"],
        tp_group=_tp_group(),
        vocab_size=vocab_size,
        chunk_size=chunk_size,
        temperature=temperature,
    )


def _forward(
    model, batch: dict, fused: bool, *, replay: bool = False, agreement: RouteAgreement | None = None
) -> tuple[torch.Tensor, dict]:
    """The last stage's logits, or with ``fused`` its hidden states and the box of
    :func:`hidden_states_instead_of_logits` (empty on other stages). ``replay`` / ``agreement``: the
    MoE routers replay / are compared with the batch's recorded routing
    (:func:`megatron_t1.mcore.moe.recorded_routing`)."""
    with recorded_routing(model, batch, replay=replay, agreement=agreement):
        if not fused:
            return model_forward(model, batch), {}
        with hidden_states_instead_of_logits(model) as box:
            return model_forward(model, batch), box


def rl_forward_step(data_iterator, model, **loss_kw):
    """``forward_step`` for :func:`megatron_t1.mcore.train_step.train_step` with the T1 loss
    (through the fused output layer when ``loss_config.fused_output_layer``; replaying the rollout's
    MoE routing with ``loss_config.routing_replay``)."""
    batch = next(data_iterator)
    lc = loss_kw["loss_config"]
    out, box = _forward(model, batch, lc.fused_output_layer, replay=lc.routing_replay)
    fused = {"output_weight": box["weight"], "reduce_hidden_grad": box["reduce_hidden_grad"]} if box else {}
    return out, partial(rl_loss_func, batch, **fused, **loss_kw)


def _logprob_loss_func(batch: dict, output: torch.Tensor, *, box: dict, **kw):
    with torch.no_grad():
        logp, ent = _logprobs_and_entropy(
            batch,
            output,
            output_weight=box.get("weight"),
            reduce_hidden_grad=box.get("reduce_hidden_grad", True),
            **kw,
        )
    zero = output.new_zeros(())
    return zero, torch.zeros((), dtype=torch.int), {"logprobs": logp, "entropy": ent}


def _logprob_forward_step(data_iterator, model, *, fused: bool, replay: bool, agreement, **kw):
    batch = next(data_iterator)
    out, box = _forward(model, batch, fused, replay=replay, agreement=agreement)
    return out, partial(_logprob_loss_func, batch, box=box, **kw)


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
    fused_output_layer: bool = False,
    routing_replay: bool = False,
    route_agreement: RouteAgreement | None = None,
) -> list[dict[str, torch.Tensor]] | None:
    """Per-token ``logprobs`` and ``entropy`` [b, s] of every micro-batch under softmax(logits / tau).

    Runs Megatron's schedule forward-only (any TP/PP), each micro-batch moved to the model's device
    when it is taken; ``fused_output_layer``: from hidden states, no logits (module docstring).
    ``routing_replay``: the MoE routers take the micro-batches' recorded experts;
    ``route_agreement``: adds up how often the routers' own choice equals the recorded one.
    Returns the list on the last pipeline stage and None elsewhere. Wrap in
    :meth:`AnchorStore.swapped_in` for the anchor's pass.
    """
    fb = get_forward_backward_func()
    outputs = fb(
        forward_step_func=partial(
            _logprob_forward_step,
            temperature=temperature,
            vocab_size=vocab_size,
            chunk_size=chunk_size,
            fused=fused_output_layer,
            replay=routing_replay,
            agreement=route_agreement,
        ),
        data_iterator=schedule_iterators(microbatches, chunks),
        model=list(chunks),
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=True,
    )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return list(outputs)
