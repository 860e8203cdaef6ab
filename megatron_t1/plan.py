"""Per-GPU memory planner: will a config fit, and if not, what to change.

``python -m megatron_t1 plan --config FILE [--job slurm/X.sh | --nodes N --gpus-per-node G] --gpu-mem 80``
prints, for the worst pipeline stage, the bytes of every resident tensor class in the phases of a
colocated T1 run (train, anchor log-probs, weight sync, rollout) and exits 0 when all fit, 3 when one
does not (with the single changes of TP, PP, micro-batch, recompute, ... that make it fit). The job's
shape comes from ``--nodes`` / ``--gpus-per-node``, else from the ``#SBATCH`` lines of ``--job``, else
from the Slurm allocation it runs in; failing all three it plans the fewest nodes that hold one model
replica and says so. Pure Python: no torch, megatron or vllm import.

Sources and the published figures this is checked against (tests/unit/test_plan.py):

* Bytes per parameter of Megatron's optimizers, from Megatron-Core's distributed-optimizer guide
  (d = data-parallel size): bf16 params + fp32 main grads + fp32 master + Adam m, v:
  18 B without, 6 + 12/d B with the distributed optimizer; fp32 params: 16 B and 8 + 8/d B.
  Our Megatron DDP keeps fp32 main grads (``grad_reduce_in_fp32=True`` in ``mcore/model.py``).
* Activations per transformer layer, Korthikanti et al. 2022 ("Reducing Activation Recomputation in
  Large Transformer Models", arXiv 2205.05198, Table 2), 16-bit activations, 1-byte dropout masks:
  no parallelism s*b*h*(34 + 5*a*s/h); TP t without SP s*b*h*(10 + 24/t + 5*a*s/(h*t)); TP + SP
  s*b*h/t*(34 + 5*a*s/h); selective recompute (core attention) 34*s*b*h/t; full recompute keeps the
  layer input 2*s*b*h (/t with SP). :func:`layer_activation_bytes` itemises the same tensors for our
  layers and reduces exactly to those formulas for a GPT-3 layer (GELU MLP of 4h, MHA, dropout,
  unfused attention), which the tests check. For our layers it differs where the layer differs:
  SwiGLU saves its fc1 output (2 x ffn wide) and its product (ffn wide): 6*ffn bytes per token
  instead of 16h, and, unfused (``bias_activation_fusion`` off, ours), silu(gate) and the
  ``x_linear + glu_linear_offset`` copy (+4*ffn); GQA saves K and V of ``num_query_groups`` heads
  only; dropout is 0 (no masks); flash attention (TransformerEngine, the cluster default) saves its
  output and the fp32 log-sum-exp (4 B per head and token) instead of the [a, s, s] scores;
  Megatron's local (unfused) attention with ``attention_softmax_in_fp32`` saves the fp32 softmax and
  its bf16 copy (6 B per score, matching the H100 measurement in bench/RESULTS.md); the unfused RoPE
  (``apply_rope_fusion`` off) saves rotated Q, K and the cos / sin it multiplies them by. Checked on
  CPU against the tensors autograd saves and the measured peak (tests/unit/test_plan_measured.py).
* Parameter counts are exact sums of tensor shapes (vocabulary padded as Megatron pads it for TP) and
  reduce to Megatron's ``theoretical_memory_usage.py`` formula plus biases; unpadded they match the
  published sizes (Qwen2.5-7B 7.61B / 6.53B non-embedding, GLM-4-9B 9.40B, GPT-3 175B by Narayanan et
  al. 2021's 12*l*h^2*(1 + 13/(12h) + (V + s)/(12*l*h))).

Assumptions (each is a line of the printed table, so a wrong one is visible):

* Pipeline: 1F1B; stage i holds min(m, pp - i) micro-batches in flight (m micro-batches per step);
  interleaving multiplies the first stage's by 1 + (pp - 1)/(pp * vpp) and is applied to every stage.
  Stage 0 also holds the input embedding, the last stage the final norm, output layer and logits.
* Micro-batches stay on the CPU and move to the GPU when the schedule takes one
  (``mcore.forward.on_device``): each in flight holds its packed-row tensors, 40 B per token of int64
  (tokens, labels, positions, two document ids) and 4 B per fp32 field (loss mask, rollout / anchor /
  old log-probs, advantages; ``data.rl_batch.collate_rl_rank``), and with the ``mask`` layout
  (``data.packing``; auto picks it only for unfused attention) a b*S*S-byte bool mask.
* Logits on the last stage, [T tokens, V = V_pad/t]: SFT's vocab-parallel cross-entropy holds the
  bf16 logits and their fp32 copy in forward, the fp32 softmax and the bf16 gradient cast from it in
  backward: 2 + 4 B per logit (measured on CPU: 6.00 B). The H200 miss of bench/RESULTS.md
  (2026-11-26, ~270 KB per token of a Qwen2.5-0.5B micro-batch) once booked as a third 2 B per logit
  is the SwiGLU ``x_linear`` copy and RoPE's cos / sin (246 KB per token there), which autograd was
  seen to save on CPU; the three SDPA rows plan 26.7 / 45.1 / 26.7 GiB against 26.9 / 45.5 / 26.9. The RL
  loss over logits (``megatron_t1.rl.logprobs``) keeps the logits for backward and allocates their
  gradient (2 x e B per logit) plus fp32 [rows, V] scratch chunks of 16M logits (1M on CPU; rows =
  ``loss.chunk_size`` if set): two, one for fp32 logits. With ``loss.fused_output_layer`` there are
  no logits: two fp32 tiles of 16M logits (4096 x 4096 on GPU; 512 x 1024 on CPU) and, in backward,
  fp32 accumulators of the gradients of the hidden states [T, h] and of the weight shard [V, h]
  (``megatron_t1.rl.fused``); under SP the fused function saves the gathered [T, h] hidden states
  (not T/t), where the output layer over logits saves its SP shard.
* RL log-prob outputs: each pass (policy, anchor) returns fp32 log-probs and entropies of every token
  of the step on the last stage (8 B per token and pass); the loop copies what the micro-batches need
  to the CPU and frees them after the advantages, so they count in the anchor log-probs phase only.
* Full recompute keeps each layer's input and, during backward, one layer's full activations.
* Anchor (RL only): sharded like the policy (TP/PP), replicated over DP; fp32 when it is an EMA
  (T1: in bf16 the EMA step is below half an ulp), in the policy's precision for resets or a frozen
  anchor; 0 on GPU with ``anchor.offload_to_cpu``. **Anchor log-probs** phase: the anchor's pass runs
  the policy's modules with the anchor's weights swapped in (``mcore.anchor_store.swapped_in``) while
  the policy's own stay resident: a copy of the anchor in the policy's dtype on the GPU (e B per
  parameter) when it is an fp32 EMA under a bf16 policy or offloaded, none otherwise; plus a
  forward-only working set (the stage input and the larger of one layer's live tensors without grad
  and, on the last stage, the output layer's hidden states with its logits or fused tiles), one
  micro-batch and the log-prob outputs of both passes.
* RL is colocated, and the phases are the RL loop's (``megatron_t1/train/rl.py`` with
  ``megatron_t1/rollout/distributed.py``): every GPU hosts a slice of one vLLM engine of
  ``vllm_tensor_parallel_size`` GPUs, the engines tiling each node (a placement that does not is a
  problem: the loop refuses it). **Train**: vLLM sleeps (weights offloaded to host memory, or dropped
  at ``sleep_level: 2``; KV cache freed) and keeps ``VLLM_ASLEEP_GIB`` (CUDA graphs, communicators).
  **Weight sync**: torch's cache is emptied (the activations' blocks go back to the driver), vLLM's
  weights wake (bf16, split over its TP) and the export streams the policy through its double-buffered
  buckets (per slot: the full bucket, its TP-gathered shards and the packed local shards; a bucket is
  ``rollout.bucket_mb`` or the largest tensor, whichever is larger), which go back to the allocator
  before the KV cache wakes. **Rollout**: the trainer's weights, grads, optimizer states and anchor
  stay (nothing is offloaded while vLLM generates) plus vLLM's share
  ``gpu_memory_utilization * gpu_mem``, which vLLM fills with its weights, ``VLLM_OVERHEAD_GIB`` of
  activations and CUDA graphs, and the KV cache in the rest. KV per token and GPU: 2 (K, V) * layers
  * max(1, groups / vllm_tp) * head_dim * 2 B.
* ``reserve_gib`` (default 3) covers the CUDA context, NCCL buffers and allocator fragmentation.
  ``--gpu-mem`` is in GiB (an H100 80GB has 79.6 GiB).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Literal

from megatron_t1.rl.chunks import chunk_rows, tile_shape

GIB = float(1 << 30)
VLLM_OVERHEAD_GIB = 2.5
"""vLLM memory inside its share that is neither weights nor KV cache (profiled activations at the
default max_num_batched_tokens, CUDA graphs, sampler buffers)."""
VLLM_ASLEEP_GIB = 1.5
"""What a sleeping colocated vLLM still holds during the train phase (CUDA-graph pools, NCCL)."""
MB_INT64_FIELDS = {"sft": 4, "rl": 5}
"""int64 [tokens] tensors of a micro-batch: SFT ``collate_packed`` tokens, labels, position_ids,
segment_ids; RL ``collate_rl_rank`` tokens, labels, position_ids, seq_ids, doc_ids."""

__all__ = [
    "GIB", "Item", "Phase", "Plan", "PlanInputs", "add_arguments", "count_parameters", "export_buffer_bytes",
    "format_plan", "inputs_from_config", "job_shape", "kv_bytes_per_token", "layer_activation_bytes",
    "layer_forward_bytes", "logits_bytes", "microbatch_bytes", "optimizer_bytes_per_param", "plan_memory",
    "rank_parameters", "run", "suggest",
]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanInputs:
    """Everything the estimate depends on (a flat copy of the config plus the cluster)."""

    # model shape
    num_layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    vocab: int
    vocab_multiple: int = 128
    swiglu: bool = True
    qkv_bias: bool = True
    linear_bias: bool = False
    layernorm: bool = False
    """LayerNorm (weight + bias) instead of RMSNorm (weight)."""
    tied: bool = False
    # training layout
    precision: Literal["bf16", "fp32"] = "bf16"
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    sp: bool = False
    dist_opt: bool = True
    micro_batch: int = 1
    seq_length: int = 4096
    global_batch: int = 1
    recompute: Literal["none", "selective", "full"] = "none"
    attention: Literal["flash", "unfused"] = "flash"
    packing: Literal["auto", "thd", "mask"] = "auto"
    """``data.packing``: thd (``cu_seqlens``) or a dense [b, 1, S, S] bool mask per micro-batch;
    auto: thd unless the attention is unfused (Megatron's, which has no THD path)."""
    device: Literal["cuda", "cpu"] = "cuda"
    """Where the step runs; only the loss's chunk / tile sizes depend on it (CPU: the measured test)."""
    # RL
    mode: Literal["sft", "rl"] = "sft"
    anchor: Literal["ema", "copy"] = "ema"
    """ema: fp32 EMA; copy: reset_every or frozen (policy precision)."""
    anchor_offload: bool = False
    fused_output_layer: bool = False
    chunk_size: int | None = None
    optim_steps_per_batch: int = 1
    """> 1: the micro-batches also carry ``old_logprobs`` (``megatron_t1/train/rl.py``)."""
    vllm_util: float = 0.5
    vllm_tp: int = 1
    engines_per_node: int = 1
    max_new_tokens: int = 16384
    bucket_mb: float = 512
    # cluster
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    reserve_gib: float = 3.0
    # paper conventions (GPT-3 reference checks); our models use 0 dropout and an fp32 softmax
    hidden_dropout: bool = False
    attention_dropout: bool = False
    softmax_fp32: bool = True
    rope_copies: bool = True
    swiglu_fused: bool = False

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return max(1, self.world // (self.tp * self.pp))

    @property
    def vocab_padded(self) -> int:
        mult = self.vocab_multiple * self.tp
        return -(-self.vocab // mult) * mult

    @property
    def micro_batches(self) -> int:
        return max(1, self.global_batch // (self.micro_batch * self.dp))

    @property
    def layout(self) -> str:
        """The packed layout the run uses: "thd" or "mask" (``mcore.model.packed_layout``)."""
        if self.packing == "auto":
            return "mask" if self.attention == "unfused" else "thd"
        return self.packing

    @property
    def elem(self) -> int:
        """Bytes of one activation / weight element in compute precision."""
        return 2 if self.precision == "bf16" else 4


def inputs_from_config(
    cfg,
    *,
    nodes: int | None = None,
    gpus_per_node: int = 8,
    gpu_mem_gib: float = 80.0,
    reserve_gib: float = 3.0,
    mode: str = "auto",
    attention: str = "flash",
) -> PlanInputs:
    """Flatten a :class:`megatron_t1.config.Config`. ``nodes=None``: the fewest nodes that hold one
    model replica (TP x PP GPUs). ``mode='auto'``: rl when ``rollout.engine`` is vllm, else sft."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    mp = p.tp * p.pp
    if nodes is None:
        nodes = max(1, -(-mp // gpus_per_node))
    if mode == "auto":
        mode = "rl" if cfg.rollout.engine == "vllm" else "sft"
    # RL trains one row per kept response (megatron_t1/train/rl.py): prompts x k rows per step.
    rows = cfg.rollout.prompts_per_step * (cfg.rollout.keep or cfg.rollout.n_samples)
    engines = cfg.rollout.engines_per_node  # None: the loop fills each node
    if engines is None:
        engines = max(1, gpus_per_node // cfg.rollout.vllm_tensor_parallel_size)
    return PlanInputs(
        num_layers=m.num_layers, hidden=m.hidden_size, ffn=m.ffn_hidden_size, heads=m.num_attention_heads,
        groups=m.query_groups, head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
        vocab=m.vocab_size, vocab_multiple=m.make_vocab_size_divisible_by, swiglu=m.swiglu,
        qkv_bias=m.add_qkv_bias or m.add_bias_linear, linear_bias=m.add_bias_linear,
        layernorm=m.normalization == "LayerNorm", tied=m.tie_word_embeddings, precision=m.precision,
        tp=p.tp, pp=p.pp, vpp=p.virtual_pipeline_model_parallel_size, sp=p.sequence_parallel,
        dist_opt=p.use_distributed_optimizer, micro_batch=d.micro_batch_size, seq_length=d.seq_length,
        global_batch=rows if mode == "rl" else d.global_batch_size, recompute=m.recompute,
        attention=attention, packing=d.packing, mode=mode,
        anchor="ema" if cfg.anchor.ema is not None else "copy", anchor_offload=cfg.anchor.offload_to_cpu,
        fused_output_layer=cfg.loss.fused_output_layer, chunk_size=cfg.loss.chunk_size,
        optim_steps_per_batch=cfg.loss.optim_steps_per_batch,
        vllm_util=cfg.rollout.gpu_memory_utilization, vllm_tp=cfg.rollout.vllm_tensor_parallel_size,
        engines_per_node=engines, max_new_tokens=cfg.rollout.max_new_tokens, bucket_mb=cfg.rollout.bucket_mb,
        nodes=nodes, gpus_per_node=gpus_per_node, gpu_mem_gib=gpu_mem_gib, reserve_gib=reserve_gib,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Parameters and optimizer bytes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCount:
    """Full (unsharded) parameter counts. ``layer_sharded`` splits over TP; ``layer_replicated``
    (norms, row-parallel biases) does not."""

    embedding: int
    layer_sharded: int
    layer_replicated: int
    num_layers: int
    final_norm: int
    output_layer: int

    @property
    def per_layer(self) -> int:
        return self.layer_sharded + self.layer_replicated

    @property
    def non_embedding(self) -> int:
        return self.num_layers * self.per_layer + self.final_norm

    @property
    def total(self) -> int:
        return self.embedding + self.non_embedding + self.output_layer


def count_parameters(x: PlanInputs, *, padded: bool = True) -> ParamCount:
    """Exact parameter count of the GPT layout (vocabulary padded for ``x.tp`` unless ``padded=False``).

    Per layer: QKV h*(q + 2kv) (+ q + 2kv bias), projection q*h (+ h), fc1 h*f*(2 if SwiGLU)
    (+ bias), fc2 f*h (+ h), two norms of h (2h each for LayerNorm), with q = heads * head_dim and
    kv = groups * head_dim. An untied output layer adds V*h.
    """
    h, f = x.hidden, x.ffn
    q, kv = x.heads * x.head_dim, x.groups * x.head_dim
    gate = 2 if x.swiglu else 1
    norm = (2 if x.layernorm else 1) * h
    sharded = h * (q + 2 * kv) + q * h + h * f * gate + f * h
    if x.qkv_bias:
        sharded += q + 2 * kv
    replicated = 2 * norm
    if x.linear_bias:
        sharded += f * gate  # fc1 bias (column parallel)
        replicated += 2 * h  # projection and fc2 biases (row parallel: added after the reduce)
    vocab = x.vocab_padded if padded else x.vocab
    emb = vocab * h
    return ParamCount(
        embedding=emb,
        layer_sharded=sharded,
        layer_replicated=replicated,
        num_layers=x.num_layers,
        final_norm=norm,
        output_layer=0 if x.tied else emb,
    )


def rank_parameters(x: PlanInputs, stage: int) -> float:
    """Parameters held by one GPU of pipeline stage ``stage``: its layers' TP shard plus replicated
    norms, the embedding on stage 0, final norm and output layer on the last stage (a tied output
    layer is a second copy there when PP > 1, as in Megatron)."""
    c = count_parameters(x)
    n = (x.num_layers // x.pp) * (c.layer_sharded / x.tp + c.layer_replicated)
    if stage == 0:
        n += c.embedding / x.tp
    if stage == x.pp - 1:
        n += c.final_norm
        if not x.tied or x.pp > 1:
            n += c.embedding / x.tp
    return n


def optimizer_bytes_per_param(precision: str, dist_opt: bool, dp: int) -> dict[str, float]:
    """Bytes per parameter of weights, main gradients and optimizer states (Megatron's table).

    bf16: weights 2, fp32 main grads 4, fp32 master + Adam m + v 12 (divided by DP when distributed).
    fp32: weights 4, grads 4, Adam m + v 8 (the weights are the master copy).
    """
    if precision == "bf16":
        w, g, o = 2.0, 4.0, 12.0
    else:
        w, g, o = 4.0, 4.0, 8.0
    return {"weights": w, "grads": g, "optimizer": o / dp if dist_opt else o}


# --------------------------------------------------------------------------------------------------
# Activations, logits, KV cache
# --------------------------------------------------------------------------------------------------


def layer_activation_bytes(
    *,
    s: int,
    b: int,
    h: int,
    heads: int,
    q_width: int,
    kv_width: int,
    ffn: int,
    tp: int = 1,
    sp: bool = False,
    swiglu: bool = True,
    attention: str = "flash",
    recompute: str = "none",
    elem: int = 2,
    hidden_dropout: bool = False,
    attention_dropout: bool = False,
    softmax_fp32: bool = True,
    rope_copies: bool = True,
    swiglu_fused: bool = False,
) -> float:
    """Bytes one GPU saves for backward in one transformer layer, for one micro-batch of b x s tokens.

    Itemised per token (e = ``elem`` bytes, masks 1 byte), following Korthikanti et al. 2022 Sec. 4:
    replicated over TP unless SP: norm1 input e*h, QKV input e*h, norm2 input e*h, fc1 input e*h,
    two dropout masks h each; split over TP: Q, K, V e*(q + 2kv), projection input e*q, fc1 output
    e*f*(2 if SwiGLU), activation output e*f, and the core attention: unfused, per score (a*s per
    token) e for the softmax output (+4 when it is computed in fp32 and cast back; +1 mask +e output
    with attention dropout); flash, 4 B of log-sum-exp per head. ``recompute='selective'`` drops the
    core-attention term; ``'full'`` keeps only the layer input e*h (split over TP with SP).
    Terms of our Megatron settings (``bias_activation_fusion`` and ``apply_rope_fusion`` off):
    the unfused SwiGLU also saves silu(gate) and ``x_linear + glu_linear_offset`` (a copy even at
    offset 0; +2e*f, ``swiglu_fused`` saves neither), and the unfused RoPE saves rotated copies of Q
    and K while V keeps the QKV output alive (+e*(q + kv)) plus the cos and sin it multiplies Q and K
    by (+4e per head_dim and token, on every TP rank: ``rope_copies``). GPT-3 (f = 4h, GELU, no RoPE,
    a = heads, dropout, e = 2, 16-bit softmax) gives s*b*h*(34 + 5*a*s/h).
    """
    if recompute == "full":
        return elem * s * b * h / (tp if sp else 1)
    replicated = 4 * elem * h + (2 * h if hidden_dropout else 0)
    sharded = elem * (q_width + 2 * kv_width) + elem * q_width
    sharded += elem * ffn * (2 if swiglu else 1) + elem * ffn
    unsplit = 0.0
    if swiglu and not swiglu_fused:
        sharded += 2 * elem * ffn
    if rope_copies:
        sharded += elem * (q_width + kv_width)
        unsplit += 4 * elem * (q_width // heads)
    if recompute != "selective":
        if attention == "unfused":
            per_score = elem + (4 if softmax_fp32 else 0) + ((1 + elem) if attention_dropout else 0)
            sharded += per_score * heads * s
        else:
            sharded += 4 * heads
    per_token = replicated / (tp if sp else 1) + sharded / tp + unsplit
    return per_token * s * b


def layer_forward_bytes(
    *,
    s: int,
    b: int,
    h: int,
    heads: int,
    q_width: int,
    kv_width: int,
    ffn: int,
    tp: int = 1,
    sp: bool = False,
    swiglu: bool = True,
    attention: str = "flash",
    elem: int = 2,
    softmax_fp32: bool = True,
    rope_copies: bool = True,
    swiglu_fused: bool = False,
    **_saved_only,
) -> float:
    """Peak bytes of one transformer layer's live tensors in a forward without grad (the RL log-prob
    passes), one micro-batch of b x s tokens on one GPU; nothing is saved for backward.

    Per token (e = ``elem`` bytes; "split" = divided by TP with SP): the layer input e*h (split; held
    by the caller until the layer returns) plus the larger sublayer's live tensors. Attention: its
    norm output e*h (split, plus the TP-gathered e*h with SP) and, divided by TP, QKV e*(q + 2kv), the
    rotated Q, K e*(q + kv) with RoPE's intermediates while Q rotates (2e*q), the core-attention
    output e*q and flash's log-sum-exp (4 B per head; unfused: per score the scores e, their fp32 copy
    and fp32 softmax 8 B, the probabilities e). MLP: the post-attention residual e*h (split), its norm
    output (as above) and, divided by TP, the fc1 output e*f*(2 if SwiGLU), silu(gate) and
    ``x_linear + offset`` (2e*f, unless fused) and the activation output e*f. The stage's input (the
    embedding output, held by the model's forward) is the caller's to add. ``_saved_only`` takes the
    dropout / recompute keywords of :func:`layer_activation_bytes`, which change no no-grad forward.
    """
    split = tp if sp else 1
    normed = elem * h / split + (elem * h if sp and tp > 1 else 0)
    attn = elem * (q_width + 2 * kv_width) + elem * q_width
    if rope_copies:
        attn += elem * (q_width + kv_width) + 2 * elem * q_width
    if attention == "unfused":
        attn += ((2 * elem + 8) if softmax_fp32 else 2 * elem) * heads * s
    else:
        attn += 4 * heads
    mlp = elem * ffn * (2 if swiglu else 1) + elem * ffn
    if swiglu and not swiglu_fused:
        mlp += 2 * elem * ffn
    per_token = elem * h / split + normed + max(attn / tp, elem * h / split + mlp / tp)
    return per_token * s * b


def microbatch_bytes(x: PlanInputs, *, train: bool = True) -> tuple[float, str]:
    """Bytes of one micro-batch's tensors on the device (moved there when the schedule takes it,
    ``mcore.forward.on_device``): int64 tokens, labels, position_ids and (RL) seq_ids, doc_ids or
    (SFT) segment_ids; fp32 loss_mask and, in RL, rollout_logprobs, plus for training (``train``)
    anchor_logprobs, advantages and, with ``optim_steps_per_batch > 1``, old_logprobs
    (``data.rl_batch.collate_rl_rank``, ``train/rl.py``). THD adds ``cu_seqlens`` (a few bytes per
    document, not counted); the mask layout a [b, 1, S, S] bool mask."""
    tokens = x.seq_length * x.micro_batch
    ints = MB_INT64_FIELDS[x.mode]
    floats = 1
    if x.mode == "rl":
        floats = 2 + ((2 + (x.optim_steps_per_batch > 1)) if train else 0)
    per_token = 8 * ints + 4 * floats
    how = f"{per_token} B/token ({ints} int64 + {floats} fp32)"
    total = float(per_token * tokens)
    if x.layout == "mask":
        mask = x.micro_batch * x.seq_length**2
        total += mask
        how += f" + [{x.micro_batch}, 1, {x.seq_length}, {x.seq_length}] bool mask ({mask / 2**20:.0f} MiB)"
    else:
        how += ", THD"
    return total, how


def logits_bytes(x: PlanInputs, *, forward_only: bool = False) -> tuple[float, str]:
    """Peak bytes of the output-layer logits and loss temporaries on the last stage (one micro-batch of
    T tokens, V = V_pad / TP columns), for the training step or (``forward_only``) a log-prob pass.

    SFT (Megatron's vocab-parallel cross-entropy): the logits and their fp32 copy in forward, the
    fp32 softmax and the gradient cast from it in backward (e + 4 B per logit either way; 4 B in
    fp32). RL over logits (``megatron_t1.rl.logprobs``): the logits e*T*V saved for backward, their
    gradient (``empty_like``, e*T*V) and fp32 [rows, V] scratch chunks (``megatron_t1.rl.chunks``)
    (rows = ``loss.chunk_size`` if set): two, or one for fp32 logits (the gradient chunk is used in
    place); a log-prob pass holds the logits and two chunks. Fused output layer
    (``megatron_t1.rl.fused``): no logits; two fp32 [rows, Vb] tiles, and in backward the fp32
    accumulators of dL/dhidden [T, h] and dL/dweight [V, h] (for bf16 inputs; for fp32 ones they are
    the returned gradients themselves, the same bytes).
    """
    tokens = x.seq_length * x.micro_batch
    cols = int(x.vocab_padded // x.tp)
    if x.mode == "sft":
        # Forward: the logits and the CE's fp32 copy; backward: that fp32 softmax, turned into the
        # gradient in place, and the gradient autograd casts back to the logits' dtype. fp32 logits:
        # ``.float()`` is the same tensor and no cast happens.
        per = x.elem + 4 if x.precision == "bf16" else 4
        return float(per * tokens * cols), f"[{tokens} x {cols}] logits + fp32 copy / grad (CE, {per} B each)"
    if x.fused_output_layer:
        rows, vb = tile_shape(tokens, cols, x.device, x.chunk_size)
        tiles = 2 * 4 * rows * vb
        how = f"fused output layer: 2 fp32 tiles of [{rows} x {vb}]"
        if forward_only:
            return float(tiles), how
        acc = 4 * (tokens + cols) * x.hidden
        return float(tiles + acc), how + f" + fp32 grads [{tokens} x {x.hidden}], [{cols} x {x.hidden}]"
    rows = max(1, min(tokens, chunk_rows(cols, x.device, x.chunk_size)))
    chunk = 4 * rows * cols
    logits = x.elem * tokens * cols
    if forward_only:
        return float(logits + 2 * chunk), f"[{tokens} x {cols}] logits + 2 fp32 chunks of [{rows} x {cols}]"
    n = 1 if x.precision == "fp32" else 2
    return float(2 * logits + n * chunk), (
        f"[{tokens} x {cols}] logits + their grad + {n} fp32 chunk{'s' if n > 1 else ''} of [{rows} x {cols}]"
    )


def export_buffer_bytes(x: PlanInputs) -> tuple[float, str]:
    """Bytes of the weight sync's reused export buffers on one GPU (``megatron_t1.mcore.export``): two
    slots, each the full bucket, the TP-gathered shards (about a full bucket) and this rank's packed
    shards; a bucket is ``bucket_mb`` or the largest tensor (the padded embedding or the fused fc1)."""
    largest = (
        x.elem
        * x.hidden
        * max(
            x.vocab_padded, (2 if x.swiglu else 1) * x.ffn, x.heads * x.head_dim + 2 * x.groups * x.head_dim
        )
    )
    bucket = max(x.bucket_mb * 2**20, largest)
    total = 2 * bucket * (2 + 1 / x.tp)
    return total, f"2 slots x (full + gathered + packed/TP) of a {bucket / 2**20:.0f} MiB bucket"


def kv_bytes_per_token(x: PlanInputs) -> float:
    """vLLM KV cache bytes per token on one GPU: 2 * layers * max(1, groups/tp) * head_dim * 2 B."""
    groups_per_gpu = max(1.0, x.groups / x.vllm_tp)
    return 2 * x.num_layers * groups_per_gpu * x.head_dim * 2


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One line of a phase: what, how many bytes per GPU, how it was computed."""

    name: str
    bytes: float
    how: str = ""


@dataclass
class Phase:
    name: str
    items: list[Item]
    stage: int | None = None
    """The pipeline stage whose GPU this is (the phase's worst; printed when not the plan's)."""

    @property
    def total(self) -> float:
        return sum(i.bytes for i in self.items)

    def get(self, name: str) -> float:
        return sum(i.bytes for i in self.items if i.name == name)


@dataclass
class Plan:
    """The estimate: phases (per GPU, worst pipeline stage), capacity, verdict and notes."""

    inputs: PlanInputs
    params_total: int
    stage: int
    stage_params: float
    phases: list[Phase]
    capacity: float
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kv_concurrency: float | None = None
    suggestions: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(p.total for p in self.phases) if self.phases else math.inf

    @property
    def fits(self) -> bool:
        return not self.problems and self.peak <= self.capacity


def _layout_problems(x: PlanInputs) -> list[str]:
    out = []
    mp = x.tp * x.pp
    if mp > x.world:
        out.append(f"TP x PP = {x.tp} x {x.pp} = {mp} GPUs > {x.nodes} node(s) x {x.gpus_per_node} GPUs")
    elif x.world % mp:
        out.append(f"{x.world} GPUs are not a multiple of TP x PP = {mp}")
    for name, n in (("attention heads", x.heads), ("query groups", x.groups), ("ffn_hidden_size", x.ffn)):
        if n % x.tp:
            out.append(f"TP={x.tp} does not divide {name} ({n})")
    if x.tp > x.gpus_per_node:
        out.append(f"TP={x.tp} spans nodes (gpus_per_node={x.gpus_per_node}): TP needs NVLink")
    if x.attention == "unfused" and x.layout == "thd":
        out.append(
            "data.packing=thd with unfused (Megatron) attention, which has no THD path: use mask or auto"
        )
    stages = x.pp * (x.vpp or 1)
    if x.num_layers % stages:
        out.append(f"PP x VPP = {stages} does not divide {x.num_layers} layers")
    if x.global_batch % (x.micro_batch * x.dp):
        out.append(
            f"global batch {x.global_batch} is not a multiple of micro-batch x DP = {x.micro_batch} x {x.dp}"
        )
    if x.mode == "rl":
        if x.heads % x.vllm_tp:
            out.append(f"vLLM TP={x.vllm_tp} does not divide {x.heads} attention heads")
        if x.engines_per_node * x.vllm_tp != x.gpus_per_node:
            out.append(
                f"rollout.engines_per_node x vllm_tensor_parallel_size = {x.engines_per_node} x {x.vllm_tp}"
                f" != {x.gpus_per_node} GPUs per node: the engines must tile each node (every GPU takes "
                "part in rollouts; the RL loop refuses this placement)"
            )
    return out


def _layer_kw(x: PlanInputs) -> dict:
    return dict(
        s=x.seq_length,
        b=x.micro_batch,
        h=x.hidden,
        heads=x.heads,
        q_width=x.heads * x.head_dim,
        kv_width=x.groups * x.head_dim,
        ffn=x.ffn,
        tp=x.tp,
        sp=x.sp,
        swiglu=x.swiglu,
        attention=x.attention,
        elem=x.elem,
        hidden_dropout=x.hidden_dropout,
        attention_dropout=x.attention_dropout,
        softmax_fp32=x.softmax_fp32,
        rope_copies=x.rope_copies,
        swiglu_fused=x.swiglu_fused,
    )


def _step_tokens(x: PlanInputs) -> int:
    """Tokens of one step on one DP rank (all its micro-batches)."""
    return x.micro_batches * x.micro_batch * x.seq_length


def _resident_items(x: PlanInputs, stage: int) -> tuple[list[Item], float]:
    """(what one GPU of ``stage`` holds in every phase, its parameters)."""
    n = rank_parameters(x, stage)
    bpp = optimizer_bytes_per_param(x.precision, x.dist_opt, x.dp)
    wname = "bf16" if x.precision == "bf16" else "fp32"
    pn = f"{n / 1e9:.3f}B params"
    resident = [
        Item("weights", bpp["weights"] * n, f"{bpp['weights']:g} B ({wname}) x {pn}"),
        Item("gradients", bpp["grads"] * n, f"{bpp['grads']:g} B (fp32 main grads) x {pn}"),
        Item(
            "optimizer states",
            bpp["optimizer"] * n,
            ("12 B (fp32 master, Adam m, v)" if x.precision == "bf16" else "8 B (Adam m, v)")
            + (f" / DP {x.dp}" if x.dist_opt else ", not sharded")
            + f" x {pn}",
        ),
    ]
    if x.mode == "rl":
        ab = 4 if x.anchor == "ema" else x.elem
        kind = "fp32 EMA" if x.anchor == "ema" else f"{wname} copy"
        if x.anchor_offload:
            host = f"{kind} offloaded to CPU ({ab * n / GIB:.1f} GiB host memory per GPU)"
            resident.append(Item("anchor", 0.0, host))
        else:
            resident.append(Item("anchor", ab * n, f"{ab} B ({kind}) x {pn}"))
    return resident, n


def _output_input_item(x: PlanInputs) -> Item:
    """What the last stage saves for backward between the last layer and the loss."""
    tokens = x.seq_length * x.micro_batch
    split = x.tp if x.sp else 1
    norm_in = x.elem * tokens * x.hidden / split
    if x.mode == "rl" and x.fused_output_layer and split > 1:
        # The fused function saves the sequence-gathered hidden states, not the SP shard.
        return Item(
            "final norm + output input",
            norm_in + x.elem * tokens * x.hidden,
            "[tokens/TP x h] norm input + [tokens x h] gathered hidden (fused, SP)",
        )
    return Item("final norm + output input", 2 * norm_in, "2 x [tokens x h] saved for backward")


def _stage_items(x: PlanInputs, stage: int) -> tuple[list[Item], list[Item], float]:
    """(resident items, activation items, params) of one GPU of ``stage`` in the train phase."""
    resident, n = _resident_items(x, stage)
    kw = _layer_kw(x)
    per_layer = layer_activation_bytes(recompute=x.recompute, **kw)
    layers = x.num_layers // x.pp
    if x.vpp:
        in_flight = x.pp * (1 + (x.pp - 1) / (x.pp * x.vpp))
    else:
        in_flight = min(x.micro_batches, x.pp - stage)
    acts = [
        Item(
            "activations",
            per_layer * layers * in_flight,
            f"{per_layer / 2**20:.1f} MiB/layer (recompute {x.recompute}) x {layers} layers"
            f" x {in_flight:g} micro-batch(es) in flight",
        )
    ]
    if x.recompute == "full":
        work = layer_activation_bytes(recompute="none", **kw)
        acts.append(Item("recompute working set", work, "one layer's activations during its backward"))
    mb, how = microbatch_bytes(x, train=True)
    acts.append(Item("micro-batch tensors", mb * in_flight, f"{how} x {in_flight:g} in flight"))
    if stage == x.pp - 1:
        lb, how = logits_bytes(x)
        acts.append(_output_input_item(x))
        acts.append(Item("logits", lb, how))
    return resident, acts, n


def _anchor_pass_items(x: PlanInputs, stage: int) -> list[Item]:
    """What the anchor's log-prob pass adds on one GPU of ``stage`` to the resident state (RL)."""
    n = rank_parameters(x, stage)
    wname = "bf16" if x.precision == "bf16" else "fp32"
    if x.anchor_offload:
        copy, how = x.elem * n, f"{x.elem} B ({wname}) x {n / 1e9:.3f}B params copied from host memory"
    elif x.anchor == "ema" and x.precision == "bf16":
        copy, how = x.elem * n, f"{x.elem} B (the fp32 EMA cast to bf16) x {n / 1e9:.3f}B params"
    else:
        copy, how = 0.0, "the anchor has the policy's dtype and device: swapped in without a copy"
    items = [Item("anchor in policy dtype", copy, how + " (AnchorStore.swapped_in)")]
    mb, how = microbatch_bytes(x, train=False)
    items.append(Item("micro-batch tensors", mb, how + " x 1 in flight (forward only)"))
    tokens = x.seq_length * x.micro_batch
    stage_in = x.elem * tokens * x.hidden / (x.tp if x.sp else 1)  # embedding output / received input
    layer = layer_forward_bytes(**_layer_kw(x))
    what = f"stage input + one layer's live tensors ({layer / 2**20:.0f} MiB, no grad)"
    work = layer
    if stage == x.pp - 1:
        lb, lhow = logits_bytes(x, forward_only=True)
        out = x.elem * tokens * x.hidden + lb  # the final (gathered) hidden states + logits or tiles
        what = f"stage input + the larger of one layer's ({layer / 2**20:.0f} MiB, no grad) and the output"
        what += f" layer's ({out / 2**20:.0f} MiB: [tokens x h] + {lhow})"
        work = max(layer, out)
        t = _step_tokens(x)
        items.append(
            Item(
                "this step's log-probs",
                16.0 * t,
                f"16 B/token x {t}: the policy pass's and the anchor pass's fp32 log-probs and entropies "
                "(freed after the advantages, train/rl.py)",
            )
        )
    items.insert(2, Item("forward working set", work + stage_in, what))
    return items


def plan_memory(x: PlanInputs) -> Plan:
    """Estimate per-GPU memory of the worst pipeline stage in the train phase (and, for RL, the
    anchor log-prob pass, weight sync and rollout phases); see the module docstring for every
    assumption."""
    problems = _layout_problems(x)
    capacity = x.gpu_mem_gib * GIB
    total = count_parameters(x, padded=False).total
    if problems and (x.tp * x.pp > x.world or x.num_layers % (x.pp * (x.vpp or 1))):
        return Plan(x, total, 0, 0.0, [], capacity, problems)
    reserve = Item("reserve", x.reserve_gib * GIB, "CUDA context, NCCL buffers, allocator fragmentation")
    asleep = Item("vLLM asleep", VLLM_ASLEEP_GIB * GIB, "CUDA graphs, communicators")

    best = None
    best_anchor = None
    resident, res_stage = [], 0  # of the stage with the most resident bytes: what stays while vLLM runs
    for stage in range(x.pp):
        res, acts, n = _stage_items(x, stage)
        fixed = [reserve] + ([asleep] if x.mode == "rl" else [])
        phase = Phase("train", res + acts + fixed, stage)
        if best is None or phase.total > best[1].total:
            best = (stage, phase, n)
        if x.mode == "rl":
            anchor_phase = Phase("anchor log-probs", res + _anchor_pass_items(x, stage) + fixed, stage)
            if best_anchor is None or anchor_phase.total > best_anchor.total:
                best_anchor = anchor_phase
        if sum(i.bytes for i in res) > sum(i.bytes for i in resident):
            resident, res_stage = res, stage
    stage, train, n = best
    plan = Plan(x, total, stage, n, [train], capacity, problems)

    if x.mode == "rl":
        plan.phases.append(best_anchor)
        share = x.vllm_util * capacity
        vw = count_parameters(x, padded=False).total * 2 / x.vllm_tp
        kv = share - vw - VLLM_OVERHEAD_GIB * GIB
        per_tok = kv_bytes_per_token(x)
        max_len = x.seq_length
        plan.kv_concurrency = max(0.0, kv) / (per_tok * max_len)
        # Both phases after training: the trainer's resident state and vLLM's woken weights.
        awake = list(resident) + [reserve, Item("vLLM weights", vw, f"bf16 / vLLM TP {x.vllm_tp}")]
        sync = Phase("weight sync", awake + [Item("export buckets", *export_buffer_bytes(x))], res_stage)
        rollout = Phase(
            "rollout",
            awake
            + [
                Item("vLLM activations, graphs", VLLM_OVERHEAD_GIB * GIB, "assumed (profiling peak)"),
                Item(
                    "vLLM KV cache",
                    max(0.0, kv),
                    f"{per_tok / 1024:.0f} KiB/token: {plan.kv_concurrency:.1f} x {max_len}-token sequences",
                ),
            ],
            res_stage,
        )
        plan.phases.extend([sync, rollout])
        if kv <= 0:
            plan.problems.append(
                f"vLLM's share ({x.vllm_util:g} x {x.gpu_mem_gib:g} GiB) does not hold its weights "
                f"({vw / GIB:.1f} GiB) and overhead: no KV cache"
            )
        elif plan.kv_concurrency < 1:
            plan.problems.append(
                f"vLLM KV cache ({kv / GIB:.1f} GiB) holds {plan.kv_concurrency:.2f} sequences of "
                f"{max_len} tokens: vLLM refuses to start below 1"
            )
        if x.seq_length < x.max_new_tokens:
            plan.notes.append(
                f"data.seq_length ({x.seq_length}) < rollout.max_new_tokens ({x.max_new_tokens}): a "
                "full-length response does not fit one packed row"
            )
    if x.tp > 1 and not x.sp and x.precision == "bf16":
        plan.notes.append("sequence parallelism is off: norm and linear inputs are replicated over TP")
    if x.dp > 1 and not x.dist_opt:
        plan.notes.append(f"the distributed optimizer is off: optimizer states are replicated over DP={x.dp}")
    return plan


# --------------------------------------------------------------------------------------------------
# What to change
# --------------------------------------------------------------------------------------------------


def _divisors_above(n: int, start: int, limit: int) -> list[int]:
    return [d for d in range(start + 1, limit + 1) if n % d == 0]


def _candidates(x: PlanInputs) -> list[tuple[str, PlanInputs]]:
    """Single changes that lower memory, cheapest in throughput first."""
    r = dataclasses.replace
    out: list[tuple[str, PlanInputs]] = []
    if x.tp > 1 and not x.sp and x.precision == "bf16":
        out.append(("parallel.sequence_parallel=true", r(x, sp=True)))
    if not x.dist_opt and x.dp > 1:
        out.append(("parallel.use_distributed_optimizer=true", r(x, dist_opt=True)))
    if x.mode == "rl" and not x.fused_output_layer:
        out.append(("loss.fused_output_layer=true", r(x, fused_output_layer=True)))
    if x.layout == "mask" and x.attention != "unfused":
        out.append(("data.packing=thd", r(x, packing="thd")))
    order = ["none", "selective", "full"]
    for rc in order[order.index(x.recompute) + 1 :]:
        out.append((f"model.recompute={rc}", r(x, recompute=rc)))
    mb = x.micro_batch // 2
    while mb >= 1:
        out.append((f"data.micro_batch_size={mb}", r(x, micro_batch=mb)))
        mb //= 2
    limit = min(x.gpus_per_node, x.heads)
    for t in _divisors_above(math.gcd(math.gcd(x.heads, x.groups), x.ffn), x.tp, limit):
        if x.world % (t * x.pp) == 0:
            sp = x.precision == "bf16"
            label = f"parallel.tensor_model_parallel_size={t}" + (" (with SP)" if sp and not x.sp else "")
            out.append((label, r(x, tp=t, sp=sp or x.sp)))
    for p in _divisors_above(x.num_layers // (x.vpp or 1), x.pp, x.num_layers):
        if x.world % (x.tp * p) == 0:
            out.append((f"parallel.pipeline_model_parallel_size={p}", r(x, pp=p)))
            break
    more = r(x, nodes=x.nodes * 2, global_batch=x.global_batch * 2)
    if x.tp * x.pp > x.world:
        out.append((f"--nodes {more.nodes} (one model replica needs {x.tp * x.pp} GPUs)", more))
    elif x.dist_opt:
        out.append((f"--nodes {more.nodes} (DP {x.dp} -> {more.dp} shards the optimizer)", more))
    if x.mode == "rl":
        if not x.anchor_offload:
            out.append(("anchor.offload_to_cpu=true", r(x, anchor_offload=True)))
        for u in (0.45, 0.4, 0.35, 0.3, 0.25):
            if u < x.vllm_util:
                out.append((f"rollout.gpu_memory_utilization={u:g}", r(x, vllm_util=u)))
        for t in (2, 4, 8):
            if t > x.vllm_tp and x.heads % t == 0 and t <= x.gpus_per_node:
                engines = x.gpus_per_node // t
                label = f"rollout.vllm_tensor_parallel_size={t} (engines_per_node={engines})"
                out.append((label, r(x, vllm_tp=t, engines_per_node=engines)))
    return out


def suggest(x: PlanInputs, *, max_items: int = 6) -> list[str]:
    """Single changes that make ``x`` fit (each with its peak); if none does, the greedy sequence of
    changes that lowers the peak most at each step, up to 4 changes."""
    fitting, seen = [], set()
    for label, y in _candidates(x):
        key = label.split("=")[0].split(" ")[0]
        if key in seen:  # keep the mildest fitting value of each knob
            continue
        p = plan_memory(y)
        if p.fits:
            seen.add(key)
            fitting.append(f"{label}: peak {p.peak / GIB:.1f} GiB")
    if fitting:
        return fitting[:max_items]
    steps, cur = [], x
    for _ in range(4):
        scored = [(plan_memory(y), label, y) for label, y in _candidates(cur)]
        scored = [s for s in scored if s[0].phases]
        if not scored:
            break
        best = min(scored, key=lambda s: (len(s[0].problems), s[0].peak))
        if best[0].peak >= plan_memory(cur).peak and not best[0].fits:
            break
        steps.append(best[1])
        cur = best[2]
        if best[0].fits:
            return ["together: " + ", ".join(steps) + f": peak {best[0].peak / GIB:.1f} GiB"]
    return [
        "no change of TP, PP, micro-batch, recompute or offload found that fits: use more or larger GPUs"
        + (f" (best reached: {', '.join(steps)})" if steps else "")
    ]


# --------------------------------------------------------------------------------------------------
# Output and CLI
# --------------------------------------------------------------------------------------------------


def format_plan(plan: Plan, source: str = "") -> str:
    """The human-readable table (GiB per GPU, worst pipeline stage)."""
    x = plan.inputs
    lines = [f"memory plan{' for ' + source if source else ''} (mode {x.mode}, attention {x.attention})"]
    lines.append(
        f"model: {x.num_layers} layers, hidden {x.hidden}, ffn {x.ffn}, {x.heads} heads / {x.groups} KV "
        f"groups, vocab {x.vocab} (padded {x.vocab_padded}): {plan.params_total / 1e9:.2f}B parameters"
    )
    lines.append(
        f"layout: {x.nodes} node(s) x {x.gpus_per_node} GPUs; TP={x.tp} PP={x.pp}"
        f"{' VPP=' + str(x.vpp) if x.vpp else ''} DP={x.dp}; SP {'on' if x.sp else 'off'}; "
        f"distributed optimizer {'on' if x.dist_opt else 'off'}; {x.precision}; micro-batch {x.micro_batch} "
        f"x {x.seq_length} tokens, {x.micro_batches} micro-batches/step; recompute {x.recompute}"
    )
    if x.mode == "rl":
        lines.append(
            f"rollout: vLLM {x.engines_per_node} engine(s)/node x TP {x.vllm_tp}, "
            f"gpu_memory_utilization {x.vllm_util:g}"
        )
    for p in plan.problems:
        lines.append(f"problem: {p}")
    if not plan.phases:
        lines.append("verdict: DOES NOT FIT (the layout cannot be placed)")
        lines.extend("  try: " + s for s in plan.suggestions)
        return "\n".join(lines)
    lines.append(f"per GPU of pipeline stage {plan.stage} ({plan.stage_params / 1e9:.3f}B params), GiB:")
    for ph in plan.phases:
        other = ph.stage is not None and ph.stage != plan.stage
        lines.append(f"  {ph.name} phase" + (f" (pipeline stage {ph.stage})" if other else ""))
        for it in ph.items:
            lines.append(f"    {it.name:<28}{it.bytes / GIB:>8.2f}  {it.how}")
        mark = "ok" if ph.total <= plan.capacity else "OVER"
        lines.append(f"    {'total':<28}{ph.total / GIB:>8.2f}  of {plan.capacity / GIB:.2f} ({mark})")
    for n in plan.notes:
        lines.append(f"note: {n}")
    if plan.fits:
        lines.append(f"verdict: fits (peak {plan.peak / GIB:.1f} of {plan.capacity / GIB:.1f} GiB)")
    else:
        worst = max(plan.phases, key=lambda p: p.total)
        big = max(worst.items, key=lambda i: i.bytes)
        lines.append(
            f"verdict: DOES NOT FIT: {worst.name} phase needs {worst.total / GIB:.1f} GiB > "
            f"{plan.capacity / GIB:.1f} GiB (largest: {big.name} {big.bytes / GIB:.1f} GiB)"
            if worst.total > plan.capacity
            else "verdict: DOES NOT FIT (see problems)"
        )
        lines.extend("  try: " + s for s in plan.suggestions)
    return "\n".join(lines)


def plan_to_dict(plan: Plan) -> dict:
    """JSON-friendly summary (GiB)."""
    return {
        "fits": plan.fits,
        "peak_gib": plan.peak / GIB if plan.phases else None,
        "capacity_gib": plan.capacity / GIB,
        "stage": plan.stage,
        "params_total": plan.params_total,
        "phases": {
            p.name: {i.name: i.bytes / GIB for i in p.items} | {"total": p.total / GIB} for p in plan.phases
        },
        "kv_concurrency": plan.kv_concurrency,
        "problems": plan.problems,
        "notes": plan.notes,
        "suggestions": plan.suggestions,
        "inputs": dataclasses.asdict(plan.inputs),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m megatron_t1 plan``."""
    parser.add_argument("--config", required=True, help="YAML config (see examples/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set data.micro_batch_size=2 (repeatable)",
    )
    parser.add_argument(
        "--job",
        default=None,
        metavar="SCRIPT",
        help="a Slurm batch script (e.g. slurm/rl_32b.sh): nodes and GPUs per node from its #SBATCH lines",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="nodes of the job (default: --job, else the Slurm allocation this runs in, else the fewest "
        "that hold TP x PP GPUs)",
    )
    parser.add_argument(
        "--gpus-per-node", type=int, default=None, help="GPUs per node (default: --job, the allocation, or 8)"
    )
    parser.add_argument(
        "--gpu-mem",
        type=float,
        default=80.0,
        help="memory per GPU in GiB (default 80; an H100 80GB reports 79.6)",
    )
    parser.add_argument(
        "--reserve-gib",
        type=float,
        default=3.0,
        help="CUDA context, NCCL buffers and fragmentation per GPU (default 3)",
    )
    parser.add_argument(
        "--mode",
        choices=["auto", "sft", "rl"],
        default="auto",
        help="auto: rl when rollout.engine is vllm (adds the anchor and the rollout phase)",
    )
    parser.add_argument(
        "--attention",
        choices=["flash", "unfused"],
        default="flash",
        help="flash: TransformerEngine spec or the local spec with model.core_attention=sdpa (the "
        "default); unfused: the local spec with model.core_attention=megatron",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")


_SBATCH = re.compile(r"^#SBATCH\s+(--nodes|-N|--gpus-per-node)(?:=|\s+)(\S+)", re.M)


def job_shape(script: str | None = None, env=None) -> tuple[int | None, int | None, str]:
    """``(nodes, gpus_per_node, source)`` of the job: from the ``#SBATCH --nodes`` / ``-N`` and
    ``--gpus-per-node`` lines of ``script`` when given, else from the Slurm allocation in ``env``
    (``SLURM_JOB_NUM_NODES``, ``SLURM_GPUS_ON_NODE``), else ``(None, None, "")``. A node range
    (``--nodes=2-4``) plans its lower end; a typed GPU count (``h100:8``) its number."""
    from megatron_t1.config import ConfigError

    if script is not None:
        try:
            text = open(script).read()
        except OSError as e:
            raise ConfigError(f"--job {script}: cannot read it ({e.strerror})") from None
        found = {}
        for key, value in _SBATCH.findall(text):
            found["nodes" if key in ("--nodes", "-N") else "gpus"] = value
        if "nodes" not in found:
            raise ConfigError(f"--job {script}: no '#SBATCH --nodes=N' line")
        try:
            nodes = int(found["nodes"].split("-")[0])
            gpus = int(found["gpus"].split(":")[-1]) if "gpus" in found else None
        except ValueError:
            raise ConfigError(f"--job {script}: cannot read '#SBATCH' values {found}") from None
        return nodes, gpus, f"from {script}"
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES"):
        nodes = int(env.get("SLURM_JOB_NUM_NODES") or env["SLURM_NNODES"])
        gpus = env.get("SLURM_GPUS_ON_NODE")
        return nodes, int(gpus.split(":")[-1]) if gpus else None, "from the Slurm allocation"
    return None, None, ""


def run(args: argparse.Namespace) -> int:
    """Print the plan; 0 when it fits, 3 when it does not (config errors raise ConfigError)."""
    from megatron_t1.config import load_config

    cfg = load_config(args.config, args.overrides)
    nodes, gpus, where = job_shape(args.job)
    nodes = args.nodes if args.nodes is not None else nodes
    gpus = args.gpus_per_node if args.gpus_per_node is not None else (gpus or 8)
    x = inputs_from_config(
        cfg,
        nodes=nodes,
        gpus_per_node=gpus,
        gpu_mem_gib=args.gpu_mem,
        reserve_gib=args.reserve_gib,
        mode=args.mode,
        attention=args.attention,
    )
    plan = plan_memory(x)
    if args.nodes is not None:
        where = "--nodes"
    elif nodes is None:
        where = "assumed: the fewest that hold TP x PP; give --job or --nodes for the job's real size"
    plan.notes.insert(0, f"job: {x.nodes} node(s) x {x.gpus_per_node} GPUs ({where})")
    if not plan.fits:
        plan.suggestions = suggest(x)
    if args.json:
        print(json.dumps(plan_to_dict(plan), indent=1))
    else:
        print(format_plan(plan, str(args.config)))
    return 0 if plan.fits else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_t1.plan", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from megatron_t1.config import ConfigError

    try:
        return run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
