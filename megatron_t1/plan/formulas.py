"""Byte and parameter formulas of the memory planner (:mod:`megatron_t1.plan`): pure arithmetic on a
:class:`PlanInputs` (a flat copy of the config plus the cluster), no torch. The phases that add
them up are :mod:`megatron_t1.plan.planner`'s.

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

Assumptions of the formulas (each is a line of the printed table, so a wrong one is visible):

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
* vLLM's KV cache per token and GPU (:func:`kv_bytes_per_token`): 2 (K, V) * layers * max(1, groups /
  vllm_tp) * head_dim * 2 B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_t1.config import ConfigError
from megatron_t1.rl.chunks import chunk_rows, tile_shape

GIB = float(1 << 30)
MB_INT64_FIELDS = {"sft": 4, "rl": 5}
"""int64 [tokens] tensors of a micro-batch: SFT ``collate_packed`` tokens, labels, position_ids,
segment_ids; RL ``collate_rl_rank`` tokens, labels, position_ids, seq_ids, doc_ids."""


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
    qk_layernorm: bool = False
    """Per-head q and k norms (Qwen3): two more norms of ``head_dim`` per layer, replicated over TP."""
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
    if m.num_experts is not None:  # the formulas count a dense MLP: MoE would be planned wrong
        raise ConfigError("plan: MoE models (model.num_experts) are not supported by the planner yet")
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
        layernorm=m.normalization == "LayerNorm", qk_layernorm=m.qk_layernorm,
        tied=m.tie_word_embeddings, precision=m.precision,
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
    (+ bias), fc2 f*h (+ h), two norms of h (2h each for LayerNorm) and, with q/k norms, two of
    head_dim, with q = heads * head_dim and kv = groups * head_dim. An untied output layer adds V*h.
    """
    h, f = x.hidden, x.ffn
    q, kv = x.heads * x.head_dim, x.groups * x.head_dim
    gate = 2 if x.swiglu else 1
    norm = (2 if x.layernorm else 1) * h
    sharded = h * (q + 2 * kv) + q * h + h * f * gate + f * h
    if x.qkv_bias:
        sharded += q + 2 * kv
    replicated = 2 * norm
    if x.qk_layernorm:
        replicated += 2 * (2 if x.layernorm else 1) * x.head_dim
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
