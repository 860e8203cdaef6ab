"""The memory plan of a colocated T1 run (:mod:`megatron_t1.plan`): for the worst pipeline stage, the
bytes per GPU of every resident tensor class in the phases of the run (train and, for RL, anchor
log-probs, weight sync, rollout), added up from :mod:`megatron_t1.plan.formulas`; the verdict; the
single changes that make a config fit (:func:`suggest`); the printed table and the JSON summary.
No torch.

Assumptions of the phases (each is a line of the printed table, so a wrong one is visible):

* Pipeline: 1F1B; stage i holds min(m, pp - i) micro-batches in flight (m micro-batches per step);
  interleaving multiplies the first stage's by 1 + (pp - 1)/(pp * vpp) and is applied to every stage.
  Stage 0 also holds the input embedding, the last stage the final norm, output layer and logits.
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
  activations and CUDA graphs, and the KV cache in the rest (per token:
  :func:`~megatron_t1.plan.formulas.kv_bytes_per_token`).
* MoE (``model.num_experts``): every GPU holds its E / EP local experts of each layer (TP-split)
  beside the dense weights; the distributed optimizer shards the dense parameters' states over DP and
  the experts' over expert-DP = DP / EP (Megatron's expert layout, EP ranks come out of DP). The
  layer activations count the routed token copies of the balanced expectation
  (:func:`~megatron_t1.plan.formulas.moe_saved_per_token`), and the train phase one layer's
  dispatcher buffers (:func:`~megatron_t1.plan.formulas.moe_dispatch_bytes`). Megatron trains MoE
  with TP > 1 only under sequence parallelism and needs EP to divide the experts and DP: other
  layouts are problems.
* ``reserve_gib`` (default 3) covers the CUDA context, NCCL buffers and allocator fragmentation.
  ``--gpu-mem`` is in GiB (an H100 80GB has 79.6 GiB).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from megatron_t1.plan.formulas import (
    GIB,
    PlanInputs,
    count_parameters,
    export_buffer_bytes,
    kv_bytes_per_token,
    layer_activation_bytes,
    layer_forward_bytes,
    logits_bytes,
    microbatch_bytes,
    moe_dispatch_bytes,
    optimizer_bytes_per_param,
    rank_parameter_split,
    rank_parameters,
)

VLLM_OVERHEAD_GIB = 2.5
"""vLLM memory inside its share that is neither weights nor KV cache (profiled activations at the
default max_num_batched_tokens, CUDA graphs, sampler buffers)."""
VLLM_ASLEEP_GIB = 1.5
"""What a sleeping colocated vLLM still holds during the train phase (CUDA-graph pools, NCCL)."""


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
    out.extend(_moe_problems(x))
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


def _moe_problems(x: PlanInputs) -> list[str]:
    """What Megatron-Core refuses in an MoE layout (or EP without experts)."""
    if not x.num_experts:
        return [f"EP={x.ep} needs an MoE model (model.num_experts)"] if x.ep > 1 else []
    out = []
    if x.num_experts % x.ep:
        out.append(
            f"EP={x.ep} does not divide the {x.num_experts} experts (parallel.expert_model_parallel_size "
            "must divide model.num_experts)"
        )
    if x.dp % x.ep:
        out.append(
            f"EP={x.ep} does not divide DP={x.dp} (world {x.world} / TP x PP = {x.tp} x {x.pp}): Megatron's "
            "EP ranks are data-parallel ranks (world = TP x EP x expert-DP x PP)"
        )
    if x.expert_ffn % x.tp:
        out.append(f"TP={x.tp} does not divide the experts' moe_ffn_hidden_size ({x.expert_ffn})")
    if x.tp > 1 and not x.sp:
        out.append(
            f"MoE with TP={x.tp} trains only with parallel.sequence_parallel=true (Megatron's MoELayer "
            "refuses TP without SP in training)"
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
        experts=x.num_experts,
        topk=x.topk,
        expert_ffn=x.expert_ffn,
        aux_loss=x.moe_aux_loss,
    )


def _step_tokens(x: PlanInputs) -> int:
    """Tokens of one step on one DP rank (all its micro-batches)."""
    return x.micro_batches * x.micro_batch * x.seq_length


def _resident_items(x: PlanInputs, stage: int) -> tuple[list[Item], float]:
    """(what one GPU of ``stage`` holds in every phase, its parameters)."""
    dense, expert = rank_parameter_split(x, stage)
    n = rank_parameters(x, stage)
    bpp = optimizer_bytes_per_param(x.precision, x.dist_opt, x.dp)
    wname = "bf16" if x.precision == "bf16" else "fp32"
    pn = f"{n / 1e9:.3f}B params"
    states = "12 B (fp32 master, Adam m, v)" if x.precision == "bf16" else "8 B (Adam m, v)"
    wpn = pn
    if x.num_experts:
        local = x.num_experts // x.ep
        wpn += f" ({expert / 1e9:.3f}B of them experts: {local} of {x.num_experts} per layer, EP {x.ep})"
        ebpp = optimizer_bytes_per_param(x.precision, x.dist_opt, x.edp)
        opt = bpp["optimizer"] * dense + ebpp["optimizer"] * expert
        opt_how = states + (
            f" / DP {x.dp} x {dense / 1e9:.3f}B dense + / expert-DP {x.edp} x {expert / 1e9:.3f}B expert"
            " params"
            if x.dist_opt
            else f", not sharded x {n / 1e9:.3f}B params"
        )
    else:
        opt = bpp["optimizer"] * n
        opt_how = states + (f" / DP {x.dp}" if x.dist_opt else ", not sharded") + f" x {pn}"
    resident = [
        Item("weights", bpp["weights"] * n, f"{bpp['weights']:g} B ({wname}) x {wpn}"),
        Item("gradients", bpp["grads"] * n, f"{bpp['grads']:g} B (fp32 main grads) x {pn}"),
        Item("optimizer states", opt, opt_how),
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
    if x.num_experts:
        acts.append(Item("MoE dispatcher buffers", *moe_dispatch_bytes(x)))
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
    layer = layer_forward_bytes(**_layer_kw(x), ep=x.ep)
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
    unplaceable = x.tp * x.pp > x.world or x.num_layers % (x.pp * (x.vpp or 1))
    if x.num_experts and (x.num_experts % x.ep or x.dp % x.ep):
        unplaceable = True  # no expert layout to plan
    if problems and unplaceable:
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
    if x.num_experts:
        plan.notes.append(
            f"MoE activations assume balanced routing (each expert gets {x.topk}/{x.num_experts} of the "
            "tokens); the busiest GPU's routed-token terms grow by the moe/load_max_over_mean the trainer "
            "logs"
        )
        if x.tp * x.ep > x.gpus_per_node:  # Megatron's rank order tp-cp-ep-dp-pp: EP strides over TP
            plan.notes.append(
                f"an EP group spans TP x EP = {x.tp * x.ep} GPUs > {x.gpus_per_node} per node: the "
                "dispatcher's all-to-all crosses nodes (throughput, not memory)"
            )
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
    widths = math.gcd(math.gcd(x.heads, x.groups), x.ffn)
    if x.num_experts:
        widths = math.gcd(widths, x.expert_ffn)
    for t in _divisors_above(widths, x.tp, limit):
        if x.world % (t * x.pp) == 0 and (x.world // (t * x.pp)) % x.ep == 0:
            sp = x.precision == "bf16"
            label = f"parallel.tensor_model_parallel_size={t}" + (" (with SP)" if sp and not x.sp else "")
            out.append((label, r(x, tp=t, sp=sp or x.sp)))
    for p in _divisors_above(x.num_layers // (x.vpp or 1), x.pp, x.num_layers):
        if x.world % (x.tp * p) == 0 and (x.world // (x.tp * p)) % x.ep == 0:
            out.append((f"parallel.pipeline_model_parallel_size={p}", r(x, pp=p)))
            break
    if x.num_experts:  # more EP: fewer local experts (EP ranks come out of DP)
        for e in _divisors_above(math.gcd(x.num_experts, x.dp), x.ep, x.dp):
            out.append((f"parallel.expert_model_parallel_size={e}", r(x, ep=e)))
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
# Output
# --------------------------------------------------------------------------------------------------


def format_plan(plan: Plan, source: str = "") -> str:
    """The human-readable table (GiB per GPU, worst pipeline stage)."""
    x = plan.inputs
    lines = [f"memory plan{' for ' + source if source else ''} (mode {x.mode}, attention {x.attention})"]
    if x.num_experts:
        c = count_parameters(x, padded=False)
        lines.append(
            f"model: {x.num_layers} layers, hidden {x.hidden}, {x.num_experts} experts of ffn "
            f"{x.expert_ffn} (top-{x.topk}{', aux loss' if x.moe_aux_loss else ''}), {x.heads} heads / "
            f"{x.groups} KV groups, "
            f"vocab {x.vocab} (padded {x.vocab_padded}): {plan.params_total / 1e9:.2f}B parameters "
            f"({c.experts / 1e9:.2f}B in experts), {c.active / 1e9:.2f}B active per token"
        )
    else:
        lines.append(
            f"model: {x.num_layers} layers, hidden {x.hidden}, ffn {x.ffn}, {x.heads} heads / {x.groups} KV "
            f"groups, vocab {x.vocab} (padded {x.vocab_padded}): {plan.params_total / 1e9:.2f}B parameters"
        )
    ep = f" EP={x.ep} (expert-DP={x.edp}, {x.num_experts // x.ep} experts/GPU)" if x.num_experts else ""
    lines.append(
        f"layout: {x.nodes} node(s) x {x.gpus_per_node} GPUs; TP={x.tp} PP={x.pp}"
        f"{' VPP=' + str(x.vpp) if x.vpp else ''} DP={x.dp}{ep}; SP {'on' if x.sp else 'off'}; "
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
    """JSON-friendly summary (GiB); MoE plans add ``params_active`` (parameters one token uses)."""
    x = plan.inputs
    return {
        "fits": plan.fits,
        "peak_gib": plan.peak / GIB if plan.phases else None,
        "capacity_gib": plan.capacity / GIB,
        "stage": plan.stage,
        "params_total": plan.params_total,
        **({"params_active": count_parameters(x, padded=False).active} if x.num_experts else {}),
        "phases": {
            p.name: {i.name: i.bytes / GIB for i in p.items} | {"total": p.total / GIB} for p in plan.phases
        },
        "kv_concurrency": plan.kv_concurrency,
        "problems": plan.problems,
        "notes": plan.notes,
        "suggestions": plan.suggestions,
        "inputs": dataclasses.asdict(plan.inputs),
    }
