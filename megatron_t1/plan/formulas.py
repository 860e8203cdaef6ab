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

MoE (Qwen3-MoE: Megatron-Core's MoE layer in every layer, ``mcore.model._moe_fields``), following
megatron-core 0.16.1's layouts, its top-k router (``transformer/moe/router.py``, ``moe_utils.py``), its
alltoall dispatcher (``token_dispatcher.py``) and ``SequentialMLP`` experts (``experts.py``; the
local spec's; TE's grouped-GEMM experts, ``model.moe_grouped_gemm``, hold the same weights and are
counted as these: what TE's grouped linears save for backward is not measured, no TE here):

* Parameters per layer: the router, an [E, h] weight replicated over TP (and over EP: every rank
  routes its own tokens), and E experts, each a gated MLP of ``expert_ffn``. Experts are split over
  the EP ranks (E / EP local experts) and each expert over TP like a dense MLP (Megatron's expert TP
  defaults to TP). Megatron's expert layout is world = TP x EP x expert-DP x PP with expert-DP = DP /
  EP: the EP ranks are data-parallel ranks, so expert parameters are replicated over expert-DP only,
  and the distributed optimizer shards their fp32 master and Adam states over expert-DP (dense ones,
  the router included, over DP). Weights, main grads and the anchor hold this GPU's shard (local
  experts only).
* Activations of the routed tokens are the *balanced expectation*: the capacity of an expert is not
  fixed (no token dropping, ``moe_expert_capacity_factor`` unset), so what one GPU computes depends on
  the router; each expert is assumed to get k*T/E of the T tokens, so every GPU processes k*T token
  copies (k*T/TP from each TP rank's SP slice, all-gathered over TP). A skewed router raises the
  busiest GPU's share by the factor the trainer logs as ``moe/load_max_over_mean``
  (``mcore/moe.py``). Saved for backward per routed copy: the expert's fc1 input e*h (the permuted,
  TP-gathered tokens: not split over TP), and, split over TP, the dense MLP's fc1 output, activation
  and unfused SwiGLU copies plus the activation scaled by the router probability (``MLP.forward``'s
  ``per_token_scale``: +e*f) and that probability (e). Per local token (the router's tokens: T/TP
  under SP): the fp32 softmax of the top-k logits (4k B), the top-k indices and the permutation's
  sorted indices (int64, 16k B), ``permute``'s ``masked_select`` inputs (the transposed [E] probs, e*E,
  and routing map, E B), the dispatcher's own references to the [E] probs and routing map (e*E + E,
  held until the layer's next forward) and, with the auxiliary loss, the fp32 softmax over all
  experts (4E B). At EP = 1 the total does not depend on the routing, and a tiny Megatron MoE layer
  saves exactly this (tests/unit/test_plan_measured.py).
* Dispatcher buffers (one layer at a time, not saved): the permuted tokens and, with EP > 1, their
  all-to-all output ([k*T/TP, h] each under SP), the experts' outputs and their concatenation
  ([k*T, h] each), alive together when the last expert has run; the combine's sort, reduce-scatter,
  all-to-all and unpermute reuse about as much. Counted once per phase, like the recompute working set.
* No-grad forwards (log-prob passes) run the experts one after another (``SequentialMLP``): one
  local expert's intermediates (k*T*EP/E tokens) at a time next to the dispatcher's buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    # MoE (0 experts: a dense MLP of ``ffn``)
    num_experts: int = 0
    """Routed experts per layer (``model.num_experts``); 0: dense."""
    topk: int = 0
    """Experts each token is sent to (``model.moe_router_topk``)."""
    expert_ffn: int = 0
    """Inner width of one expert's (gated) MLP (``model.expert_ffn``)."""
    ep: int = 1
    """Expert parallelism (``parallel.expert_model_parallel_size``): EP ranks are DP ranks."""
    moe_aux_loss: bool = False
    """The load-balancing loss is on (``model.moe_aux_loss_coeff > 0``): the router keeps its fp32
    softmax over all experts for it."""
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
    def edp(self) -> int:
        """Expert data parallelism: DP / EP ranks hold the same experts (Megatron's expert layout)."""
        return max(1, self.dp // self.ep)

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
    model replica (TP x PP GPUs; TP x PP x EP for MoE, whose EP ranks come out of DP). ``mode='auto'``:
    rl when ``rollout.engine`` is vllm, else sft."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    moe = m.num_experts is not None
    mp = p.tp * p.pp * p.ep
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
        tied=m.tie_word_embeddings, num_experts=m.num_experts or 0, topk=m.moe_router_topk if moe else 0,
        expert_ffn=m.expert_ffn if moe else 0, ep=p.ep, moe_aux_loss=moe and m.moe_aux_loss_coeff > 0,
        precision=m.precision, tp=p.tp, pp=p.pp, vpp=p.virtual_pipeline_model_parallel_size,
        sp=p.sequence_parallel,
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
    (norms, row-parallel biases, the MoE router) does not. MoE experts are split over EP as well:
    ``expert_sharded`` over TP x EP, ``expert_replicated`` (their row-parallel biases) over EP only."""

    embedding: int
    layer_sharded: int
    layer_replicated: int
    num_layers: int
    final_norm: int
    output_layer: int
    expert_sharded: int = 0
    expert_replicated: int = 0
    num_experts: int = 0
    topk: int = 0

    @property
    def per_layer(self) -> int:
        return self.layer_sharded + self.layer_replicated + self.expert_sharded + self.expert_replicated

    @property
    def experts(self) -> int:
        """All experts of all layers."""
        return self.num_layers * (self.expert_sharded + self.expert_replicated)

    @property
    def active(self) -> int:
        """Parameters one token uses (the k of E experts it is routed to): what its FLOPs scale with
        (Qwen3-30B-A3B: 3.3B of 30.5B)."""
        if not self.num_experts:
            return self.total
        return self.total - self.experts * (self.num_experts - self.topk) // self.num_experts

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
    MoE: the MLP is a router of E*h (+ E bias) and E experts of fc1 h*f_e*(2 if SwiGLU) (+ bias) and
    fc2 f_e*h (+ h), f_e = ``expert_ffn``; the dense ``ffn`` is unused (Qwen3-MoE's
    ``intermediate_size``, which no layer of Qwen3-30B-A3B has).
    """
    h = x.hidden
    q, kv = x.heads * x.head_dim, x.groups * x.head_dim
    gate = 2 if x.swiglu else 1
    norm = (2 if x.layernorm else 1) * h
    sharded = h * (q + 2 * kv) + q * h
    if x.qkv_bias:
        sharded += q + 2 * kv
    replicated = 2 * norm
    if x.qk_layernorm:
        replicated += 2 * (2 if x.layernorm else 1) * x.head_dim
    if x.linear_bias:
        replicated += h  # projection bias (row parallel: added after the reduce)
    e_sharded = e_replicated = 0
    if x.num_experts:
        fe, n = x.expert_ffn, x.num_experts
        replicated += n * h + (n if x.linear_bias else 0)  # the router: every TP rank routes alike
        e_sharded = n * (h * fe * gate + fe * h + (fe * gate if x.linear_bias else 0))
        e_replicated = n * h if x.linear_bias else 0  # each expert's fc2 bias
    else:
        f = x.ffn
        sharded += h * f * gate + f * h
        if x.linear_bias:
            sharded += f * gate  # fc1 bias (column parallel)
            replicated += h  # fc2 bias (row parallel)
    vocab = x.vocab_padded if padded else x.vocab
    emb = vocab * h
    return ParamCount(
        embedding=emb,
        layer_sharded=sharded,
        layer_replicated=replicated,
        num_layers=x.num_layers,
        final_norm=norm,
        output_layer=0 if x.tied else emb,
        expert_sharded=e_sharded,
        expert_replicated=e_replicated,
        num_experts=x.num_experts,
        topk=x.topk,
    )


def rank_parameters(x: PlanInputs, stage: int) -> float:
    """Parameters held by one GPU of pipeline stage ``stage``: its layers' TP shard plus replicated
    norms, the embedding on stage 0, final norm and output layer on the last stage (a tied output
    layer is a second copy there when PP > 1, as in Megatron); with MoE, its local experts' shard."""
    return sum(rank_parameter_split(x, stage))


def rank_parameter_split(x: PlanInputs, stage: int) -> tuple[float, float]:
    """``(dense, expert)`` parameters of one GPU of ``stage`` (:func:`rank_parameters`): the two
    differ in how the distributed optimizer shards them (over DP, over expert-DP = DP / EP)."""
    c = count_parameters(x)
    layers = x.num_layers // x.pp
    dense = layers * (c.layer_sharded / x.tp + c.layer_replicated)
    expert = layers * (c.expert_sharded / x.tp + c.expert_replicated) / x.ep
    if stage == 0:
        dense += c.embedding / x.tp
    if stage == x.pp - 1:
        dense += c.final_norm
        if not x.tied or x.pp > 1:
            dense += c.embedding / x.tp
    return dense, expert


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
    experts: int = 0,
    topk: int = 0,
    expert_ffn: int = 0,
    aux_loss: bool = False,
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
    MoE (``experts`` > 0; the fc1 input above is then the router's input): no dense MLP; the routed
    token copies and router tensors of :func:`moe_saved_per_token` instead (the balanced expectation,
    module docstring: the same on every EP rank, so EP does not enter).
    """
    split = tp if sp else 1
    if recompute == "full":
        return elem * s * b * h / split
    replicated = 4 * elem * h + (2 * h if hidden_dropout else 0)
    sharded = elem * (q_width + 2 * kv_width) + elem * q_width
    unsplit = 0.0
    if not experts:
        sharded += elem * _mlp_width(ffn, swiglu, swiglu_fused)
    if rope_copies:
        sharded += elem * (q_width + kv_width)
        unsplit += 4 * elem * (q_width // heads)
    if recompute != "selective":
        if attention == "unfused":
            per_score = elem + (4 if softmax_fp32 else 0) + ((1 + elem) if attention_dropout else 0)
            sharded += per_score * heads * s
        else:
            sharded += 4 * heads
    per_token = replicated / split + sharded / tp + unsplit
    if experts:
        per_token += moe_saved_per_token(
            h=h, experts=experts, topk=topk, expert_ffn=expert_ffn, tp=tp, sp=sp, swiglu=swiglu,
            swiglu_fused=swiglu_fused, elem=elem, aux_loss=aux_loss,
        )  # fmt: skip
    return per_token * s * b


def _mlp_width(ffn: int, swiglu: bool, swiglu_fused: bool) -> int:
    """Elements per token a (gated) MLP of ``ffn`` saves on one GPU before the TP split: fc1 output
    (2f with SwiGLU), the activation output f and, unfused, silu(gate) and ``x_linear + offset``."""
    return ffn * (2 if swiglu else 1) + ffn + (2 * ffn if swiglu and not swiglu_fused else 0)


def routed_copies(topk: int, tp: int, sp: bool) -> float:
    """Token copies one GPU's experts process per token of the micro-batch (balanced expectation):
    each TP rank dispatches its tokens' k copies, the EP all-to-all brings as many back for the local
    experts, and the TP all-gather hands every TP rank the group's: k under SP (k*T/TP from each of TP
    ranks); k*TP without SP, where every TP rank holds and dispatches all T tokens (Megatron refuses
    to train MoE that way, :func:`megatron_t1.plan.planner._moe_problems`)."""
    return topk * (1 if sp else tp)


def moe_saved_per_token(
    *,
    h: int,
    experts: int,
    topk: int,
    expert_ffn: int,
    tp: int = 1,
    sp: bool = False,
    swiglu: bool = True,
    swiglu_fused: bool = False,
    elem: int = 2,
    aux_loss: bool = False,
) -> float:
    """Bytes one GPU saves for backward in one MoE layer's MLP per token of the micro-batch (beyond the
    norm output the router takes, counted with the layer).

    Per routed copy (:func:`routed_copies`): the expert's fc1 input e*h (the permuted, TP-gathered
    tokens, not split over TP) and, split over TP, the dense MLP's tensors of an ``expert_ffn``-wide
    MLP (:func:`_mlp_width`) plus the activation scaled by the router probability e*f_e (the fc2
    input; ``MLP.forward``'s ``per_token_scale``) and that probability (e). Per local token (/TP
    under SP), with the router's probabilities in the compute dtype (``moe_router_dtype`` unset):
    the fp32 softmax of the top-k logits (4k B), the int64 top-k indices (8k B, kept by the scatter
    into [E] probabilities) and the permutation's sorted token indices (8k B, ``index_select``);
    ``permute``'s ``masked_select`` keeps its inputs, the transposed probabilities (e*E) and routing
    map (E B); the dispatcher holds the [E] probabilities and routing map (e*E + E) until the layer's
    next forward; with the auxiliary loss, the fp32 softmax over all experts (4E B).
    """
    routed = routed_copies(topk, tp, sp)
    expert = elem * h + elem * (_mlp_width(expert_ffn, swiglu, swiglu_fused) + expert_ffn) / tp + elem
    router = 20 * topk + 2 * (elem + 1) * experts + (4 * experts if aux_loss else 0)
    return routed * expert + router / (tp if sp else 1)


def _permuted_copies(ep: int) -> int:
    """Copies of the permuted local tokens alive in an MoE layer: the permutation's output and, with
    EP > 1, the all-to-all's (at EP = 1 ``all_to_all`` returns its input)."""
    return 2 if ep > 1 else 1


def moe_dispatch_bytes(x: PlanInputs) -> tuple[float, str]:
    """Bytes of the alltoall dispatcher's buffers in one MoE layer, one micro-batch (not saved for
    backward; one layer at a time): the permuted tokens and (EP > 1) their EP all-to-all output,
    [k*T/TP, h] each under SP, and the experts' outputs with their concatenation, [k*T, h] each
    (balanced expectation, module docstring). The experts' sorted input is saved for backward
    (:func:`moe_saved_per_token`), not counted here."""
    tokens = x.seq_length * x.micro_batch
    split = x.tp if x.sp else 1
    local = x.topk * tokens / split
    routed = routed_copies(x.topk, x.tp, x.sp) * tokens
    permuted = _permuted_copies(x.ep)
    total = x.elem * x.hidden * (permuted * local + 2 * routed)
    what = "permuted tokens (EP all-to-all in, out)" if permuted == 2 else "permuted tokens"
    how = (
        f"{permuted} x [{local:.0f} x h] {what} + 2 x [{routed:.0f} x h] expert outputs (+ concatenated); "
        f"top-{x.topk}, balanced routing"
    )
    return total, how


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
    experts: int = 0,
    topk: int = 0,
    expert_ffn: int = 0,
    ep: int = 1,
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
    MoE: the MLP is the residual and its norm output (split: the router takes the SP slice, nothing
    is gathered per token), the router's [E] probabilities and routing map ((e + 1)*E B, split), the
    permuted tokens (k/TP per token under SP; twice with EP > 1, :func:`_permuted_copies`), the
    experts' sorted input and outputs (:func:`routed_copies` each) and the larger of the outputs'
    concatenation and one local expert's intermediates (``SequentialMLP`` runs the E/EP local
    experts in turn, each on k*EP/E of the routed copies in the balanced expectation).
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
    if experts:
        routed = routed_copies(topk, tp, sp)
        one_expert = routed * ep / experts * elem * _mlp_width(expert_ffn, swiglu, swiglu_fused) / tp
        moe = elem * h * (_permuted_copies(ep) * topk / split + 2 * routed)  # permuted, sorted, outputs
        moe += max(elem * h * routed, one_expert) + (elem + 1) * experts / split
        per_token = elem * h / split + max(normed + attn / tp, 2 * elem * h / split + moe)
    else:
        mlp_branch = elem * h / split + elem * _mlp_width(ffn, swiglu, swiglu_fused) / tp
        per_token = elem * h / split + normed + max(attn / tp, mlp_branch)
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
    shards; a bucket is ``bucket_mb`` or the largest tensor (the padded embedding or the fused fc1;
    MoE: one expert's fc1, ``expert_ffn`` wide)."""
    ffn = x.expert_ffn if x.num_experts else x.ffn
    largest = (
        x.elem
        * x.hidden
        * max(x.vocab_padded, (2 if x.swiglu else 1) * ffn, x.heads * x.head_dim + 2 * x.groups * x.head_dim)
    )
    bucket = max(x.bucket_mb * 2**20, largest)
    total = 2 * bucket * (2 + 1 / x.tp)
    return total, f"2 slots x (full + gathered + packed/TP) of a {bucket / 2**20:.0f} MiB bucket"


def kv_bytes_per_token(x: PlanInputs) -> float:
    """vLLM KV cache bytes per token on one GPU: 2 * layers * max(1, groups/tp) * head_dim * 2 B."""
    groups_per_gpu = max(1.0, x.groups / x.vllm_tp)
    return 2 * x.num_layers * groups_per_gpu * x.head_dim * 2
