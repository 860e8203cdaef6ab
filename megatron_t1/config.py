"""The one typed config tree of megatron_t1.

Every knob of a run is a field of a dataclass below, with a docstring under it. A run's config is
loaded from YAML strictly (an unknown key is an error naming the key and the file; a wrong type names
the field and the value), overridden with ``--set a.b=c``, validated, and written resolved into the
run folder (``runs/NAME/config.yaml``).

This module never imports megatron or vllm: ``megatron_t1.mcore.model.transformer_config`` is the
one place that turns :class:`ModelConfig` into a Megatron ``TransformerConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megatron_t1.atomic import write_text_atomic
from megatron_t1.data.template import DEFAULT_PROMPT_TEMPLATE, check_template
from megatron_t1.reward.config import RewardConfig
from megatron_t1.rl.config import AnchorConfig, LossConfig

__all__ = [
    "AnchorConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LogConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RewardConfig",
    "RolloutConfig",
    "RunConfig",
    "apply_overrides",
    "load_config",
    "model_config_from_hf",
    "save_config",
]


class ConfigError(ValueError):
    """A config problem, with a message that names the file, key and value."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Architecture of the GPT-style policy (Qwen2 / Qwen3 / Qwen3-MoE / Llama / GLM-4 layouts)."""

    hf_config: str | None = None
    """Path to an HF ``config.json`` (or a folder holding one). When set, the architecture fields
    below are read from it (see :func:`model_config_from_hf`); keys also given in YAML must agree."""
    arch: Literal["qwen2", "qwen3", "qwen3_moe", "llama", "glm"] = "qwen2"
    """Family of the layout (decides HF tensor names and GLM's partial rotary / no-bias defaults)."""
    num_layers: int = 2
    """Number of transformer blocks."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 176
    """Inner width of the (gated) MLP."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None means as many as query heads."""
    kv_channels: int | None = None
    """Head dimension; None means hidden_size / num_attention_heads."""
    vocab_size: int = 512
    """Real vocabulary size (the tokenizer's). Megatron pads it for TP; padded rows are masked."""
    make_vocab_size_divisible_by: int = 128
    """Padding granularity per TP rank (Megatron's convention): padded = ceil(V / (m * tp)) * m * tp."""
    max_position_embeddings: int = 4096
    """Longest sequence RoPE is set up for."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rotary_percent: float = 1.0
    """Fraction of the head dimension that is rotated (GLM-4: 0.5)."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Normalisation layer."""
    add_qkv_bias: bool = True
    """Bias on the QKV projection (Qwen2: yes; Qwen3: no; Llama: no; GLM-4: yes)."""
    add_bias_linear: bool = False
    """Bias on the other linear layers."""
    qk_layernorm: bool = False
    """Normalise each query and key head (over its ``kv_channels`` entries, before RoPE) with the
    layer's norm kind and ``norm_epsilon``; one weight of ``kv_channels`` per layer for q and one for
    k, shared by all heads and replicated over TP (Qwen3: yes; Qwen2, Llama, GLM-4: no)."""
    swiglu: bool = True
    """Gated SiLU MLP (fc1 holds gate and up)."""
    num_experts: int | None = None
    """Routed experts per layer (Megatron-Core's MoE layer in every layer, no shared expert); None:
    a dense MLP of ``ffn_hidden_size`` (Qwen3-MoE: ``num_experts``, 128 in Qwen3-30B-A3B)."""
    moe_router_topk: int = 2
    """Experts each token is sent to (Qwen3-MoE: ``num_experts_per_tok``, 8). Only with num_experts."""
    moe_ffn_hidden_size: int | None = None
    """Inner width of each expert's gated MLP; None: ``ffn_hidden_size`` (Qwen3-MoE:
    ``moe_intermediate_size``)."""
    norm_topk_prob: bool = True
    """Router weights: softmax over all experts, keep the top k, and with this set divide the k
    weights by their sum (Qwen3-MoE's ``norm_topk_prob``; equal to Megatron's softmax over the top-k
    logits); unset, the k softmax probabilities are used as they are."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of Megatron's load-balancing auxiliary loss (Switch-style, per micro-batch) added to the
    gradient; 0 turns it off (Qwen3-MoE's ``router_aux_loss_coef`` is 0.001, used when training)."""
    moe_grouped_gemm: bool | None = None
    """Run each layer's local experts as one grouped GEMM (TransformerEngine's ``GroupedLinear``,
    Megatron's ``TEGroupedMLP``) instead of one GEMM per expert (``SequentialMLP``). null: when the
    TE spec is used and TE has grouped linears; true: required (an error without them); false: never.
    The weights are the same per-expert matrices under other parameter names, and both save the same
    distributed checkpoint, so conversion, export and checkpoints do not depend on it. Only with
    num_experts."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the output layer."""
    init_method_std: float = 0.02
    """Std of the normal init for freshly built models."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Compute precision. bf16 keeps fp32 master weights in the optimizer (GPU; CPU runs stay fp32)."""
    core_attention: Literal["sdpa", "megatron"] = "sdpa"
    """Core attention of the local layer spec (no TransformerEngine): ``sdpa`` runs
    ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels, no [b, heads, s, s] tensor
    kept for backward: 1.4x faster tiny SFT steps on CPU, bench/attention.py; less memory on GPU);
    ``megatron`` is Megatron's own unfused ``DotProductAttention``. Same numbers either way
    (tests/dist/test_sdpa_attention.py). Ignored when the TE spec is used."""
    recompute: Literal["none", "full", "selective"] = "none"
    """Activation recomputation: none, full (every layer), or selective (attention core only)."""
    tokenizer: str | None = None
    """Path of an HF tokenizer folder (chat template, EOS, pad)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.num_query_groups is not None and self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"model.num_query_groups ({self.num_query_groups})"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_attention_heads "
                f"({self.num_attention_heads}) unless model.kv_channels is set"
            )
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ConfigError(f"model.rotary_percent must be in (0, 1], got {self.rotary_percent}")
        if self.num_experts is not None:
            if self.num_experts < 2:
                raise ConfigError(f"model.num_experts must be >= 2 (or null: dense), got {self.num_experts}")
            if not 1 <= self.moe_router_topk <= self.num_experts:
                raise ConfigError(
                    f"model.moe_router_topk must be in [1, model.num_experts={self.num_experts}], "
                    f"got {self.moe_router_topk}"
                )
            if self.moe_ffn_hidden_size is not None and self.moe_ffn_hidden_size <= 0:
                raise ConfigError(f"model.moe_ffn_hidden_size must be > 0, got {self.moe_ffn_hidden_size}")
        if self.moe_aux_loss_coeff < 0:
            raise ConfigError(f"model.moe_aux_loss_coeff must be >= 0, got {self.moe_aux_loss_coeff}")
        if self.moe_grouped_gemm and self.num_experts is None:
            raise ConfigError("model.moe_grouped_gemm=true needs model.num_experts (this model is dense)")

    @property
    def expert_ffn(self) -> int:
        """Inner width of one expert (``moe_ffn_hidden_size``, else ``ffn_hidden_size``)."""
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def padded_vocab_size(self, tp: int) -> int:
        """Vocabulary rows of the embedding / output layer after padding for ``tp`` ranks."""
        mult = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // mult) * mult


@dataclass
class ParallelConfig:
    """How ranks split the model: tensor (TP), pipeline (PP) and data (DP) parallelism."""

    tensor_model_parallel_size: int = 1
    """TP degree. Must divide attention heads and query groups (GQA limits TP: GLM-4-9B allows <= 2)."""
    pipeline_model_parallel_size: int = 1
    """PP degree. Must divide the number of layers (times virtual stages)."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Interleaved pipeline: model chunks per PP rank (None = not interleaved)."""
    expert_model_parallel_size: int = 1
    """EP degree: the experts of each MoE layer are split over EP ranks (``model.num_experts`` must be
    divisible by it). As in Megatron-Core, EP ranks are taken from the data-parallel ranks (the expert
    layers keep TP and PP, so EP must divide DP = world / (TP x PP)). Expert gradients are reduced
    over the expert-data-parallel group (DP / EP ranks), the rest over DP; checkpoints, the anchor
    and the weight sync shard and gather experts over EP (tests/dist/test_moe_train.py)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (TP > 1, GPU with TransformerEngine only)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer states over DP ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap DP gradient all-reduce with backward (GPU)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto = nccl with CUDA, gloo otherwise."""
    timeout_minutes: float = 10.0
    """Collective timeout; gloo hangs rather than fails, so keep it finite."""

    def __post_init__(self) -> None:
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "expert_model_parallel_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 1 or self.pipeline_model_parallel_size == 1 and vpp > 1):
            raise ConfigError(
                f"parallel.virtual_pipeline_model_parallel_size={vpp} needs pipeline_model_parallel_size > 1"
            )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("parallel.sequence_parallel needs tensor_model_parallel_size > 1")

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def ep(self) -> int:
        return self.expert_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """DP = world / (TP * PP); raises naming the sizes when that is not an integer, or when EP does
        not divide DP (Megatron's expert layout: world = TP x EP x expert-DP x PP)."""
        mp = self.tp * self.pp
        if world_size % mp:
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size x "
                f"pipeline_model_parallel_size = {self.tp} x {self.pp} = {mp}"
            )
        dp = world_size // mp
        if dp % self.ep:
            raise ConfigError(
                f"data-parallel size {dp} (world {world_size} / TP x PP) is not divisible by "
                f"parallel.expert_model_parallel_size ({self.ep})"
            )
        return dp


@dataclass
class DataConfig:
    """Training data (SFT conversations or RL prompts) and batching."""

    train_path: str | None = None
    """jsonl or parquet file. SFT: rows with a ``messages`` list; RL: rows with a prompt and answer."""
    valid_path: str | None = None
    """Optional held-out file in the same layout (SFT: validation loss)."""
    messages_field: str = "messages"
    """Column holding the chat list (the released T1 SFT set's layout)."""
    seq_length: int = 256
    """Packed sequence length (tokens per micro-batch row)."""
    micro_batch_size: int = 1
    """Packed rows per micro-batch per DP rank."""
    global_batch_size: int = 8
    """Packed rows per optimizer step over all DP ranks (micro x DP x accumulation steps)."""
    packing: Literal["auto", "thd", "mask"] = "auto"
    """How packed documents are kept apart in attention: ``thd`` lays a micro-batch's rows end to end
    with ``cu_seqlens`` offsets (TransformerEngine's varlen attention, our SDPA core attention; a few
    bytes per token); ``mask`` builds a dense [S, S] block-diagonal mask per row (B*S*S bytes; the only
    layout of ``model.core_attention=megatron``); ``auto`` picks thd unless the attention needs the
    mask. A layout the attention cannot honour is an error (TE: thd only)."""
    seed: int = 1234
    """Shuffle seed; the order is a pure function of (seed, epoch)."""
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    """RL rollouts' and held-out evaluation's user message, ``{question}`` where the question goes
    (plain replacement: ``\\boxed{}`` needs no escaping). Default: the common math-reasoning
    instruction asking for a final ``\\boxed{}`` answer, which the reward reads
    (:mod:`megatron_t1.data.template`). The tokenizer's chat template renders the messages."""
    system_prompt: str | None = None
    """Optional system message before the prompt (RL rollouts and held-out evaluation)."""

    def __post_init__(self) -> None:
        for name in ("seq_length", "micro_batch_size", "global_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        try:
            check_template(self.prompt_template)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class OptimConfig:
    """Adam with fp32 master weights, gradient clipping and a warmup + decay schedule."""

    optimizer: Literal["adam", "sgd"] = "adam"
    """Adam (T1), or SGD with momentum ``sgd_momentum`` (steps proportional to the gradient: no
    per-parameter normalisation that turns low-signal gradients into full-size noisy steps)."""
    sgd_momentum: float = 0.9
    """Momentum of SGD."""
    lr: float = 1e-5
    """Peak learning rate (T1: SFT 1e-5, RL 1.5e-6)."""
    min_lr: float = 0.0
    """Floor of the decay."""
    lr_warmup_steps: int = 0
    """Linear warmup steps."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay after warmup, down to min_lr at the last step."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}")


@dataclass
class CheckpointConfig:
    """Distributed checkpoints: where a run starts from, how often it saves, what it keeps."""

    init_from: str | None = None
    """Weights-only start (an SFT or converted checkpoint folder). Ignored when the run folder has a
    ``latest`` checkpoint: a started run always resumes from its own state."""
    save_interval: int = 0
    """Save every N optimizer steps (0: only at the end)."""
    keep_last: int = 2
    """Number of step checkpoints kept in the run folder (older ones are deleted after a save)."""
    save_optimizer: bool = True
    """Include optimizer and scheduler state (needed for exact resume)."""
    optimizer_format: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """How the *distributed* optimizer's states are saved (``parallel.use_distributed_optimizer``; the
    plain optimizer's are whole tensors and resume at any layout). ``dp_reshardable`` (Megatron-LM's
    default): each rank writes its own shard of the flat buffers, no communication; a resume keeps
    TP, PP and EP. ``fully_reshardable``: the shards are gathered over DP into whole per-parameter
    tensors (each rank holds its model shard's full fp32 states during the save: 12 bytes a
    parameter / (TP x PP)), and the run resumes at any layout."""
    resume: bool = True
    """Resume from ``runs/NAME/checkpoints/latest`` when present."""
    keep_best: bool = False
    """RL: keep the checkpoint with the best held-out accuracy (model selection on ``eval.heldout_path``,
    which should then be a validation set, disjoint from the test problems). Every held-out evaluation
    (``eval.eval_every``) saves a checkpoint; ``checkpoints/best`` names the best (ties: the later
    step), ``keep_last`` never deletes it, and the run exports it as ``hf_best/`` beside ``hf/``."""

    def __post_init__(self) -> None:
        if self.save_interval < 0 or self.keep_last < 1:
            raise ConfigError("checkpoint.save_interval must be >= 0 and checkpoint.keep_last >= 1")


@dataclass
class LogConfig:
    """Console and tensorboard logging."""

    interval: int = 1
    """Steps between console / tensorboard scalars."""
    tensorboard: bool = True
    """Write tensorboard events into runs/NAME/tb."""
    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0 (off in CI logs is fine)."""


@dataclass
class RunConfig:
    """Identity and length of a run."""

    name: str = "run"
    """Run name: everything goes into ``{output_dir}/{name}/``."""
    output_dir: str = "runs"
    """Parent folder of run folders."""
    seed: int = 1234
    """Seed for model init, dropout and sampling."""
    train_steps: int = 100
    """Optimizer steps (SFT: over the packed data, cycling epochs; RL: rollout batches)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available."""
    max_skipped_steps: int = 3
    """A step whose loss or gradient norm is not finite is skipped (weights untouched) and logged;
    this many skipped steps in a row stop the run with an error."""
    exit_interval: int | None = None
    """Stop (after saving a checkpoint) every N steps; rerunning the same command resumes. For
    preemptible queues and time-limited jobs, like Megatron-LM's --exit-interval."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"run.name must be a non-empty folder name, got {self.name!r}")
        if self.train_steps < 1:
            raise ConfigError(f"run.train_steps must be >= 1, got {self.train_steps}")
        if self.exit_interval is not None and self.exit_interval < 1:
            raise ConfigError(f"run.exit_interval must be >= 1 or null, got {self.exit_interval}")
        if self.max_skipped_steps < 1:
            raise ConfigError(f"run.max_skipped_steps must be >= 1, got {self.max_skipped_steps}")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class RolloutConfig:
    """Sampling of K responses per prompt (T1: K=64, temperature ~1.2, full tempered distribution)."""

    engine: Literal["hf", "vllm"] = "hf"
    """Rollout engine: a transformers model with our decoding loop (CPU default) or vLLM."""
    prompts_per_step: int = 32
    """Prompts per RL step (T1: 32)."""
    n_samples: int = 64
    """K: responses sampled per prompt (T1: 64)."""
    keep: int | None = None
    """k <= K responses kept per prompt after selection (None: keep all)."""
    selection: Literal["all", "random", "balanced", "drop_flat"] = "all"
    """How k of K are kept; drop_flat drops groups whose rewards are all equal."""
    temperature: float = 1.2
    """Sampling temperature; trainer log-probs use logits / temperature."""
    top_p: float = 1.0
    """Nucleus sampling. RL keeps 1.0 so that trainer and sampler agree."""
    top_k: int = -1
    """Top-k (-1 disables). RL keeps -1."""
    min_p: float = 0.0
    """Min-p truncation (0 disables). RL keeps 0."""
    stop: list[str] = field(default_factory=list)
    """Stop strings, kept in the output; EOS always stops."""
    max_new_tokens: int = 16384
    """Generation limit; hitting it is the over-long penalty (T1: 16384 for 32B, 10240 for 9B/14B)."""
    bucket_mb: int = 512
    """Weight-sync bucket size in MB."""
    engines_per_node: int | None = None
    """Rollout engines per node (colocated): each is a group of ``vllm_tensor_parallel_size``
    consecutive ranks and the groups must tile the node (``engines_per_node x
    vllm_tensor_parallel_size`` = ranks per node). None: as many as fill a node."""
    vllm_tensor_parallel_size: int = 1
    """Ranks (GPUs) per rollout engine: vLLM's tensor-parallel size. The HF engine has no tensor
    parallelism: with more than 1, the group's first rank runs it and the others wait."""
    timeout_minutes: float = 60.0
    """How long a rank waits for the slowest engine of a step (generation, held-out evaluation)
    before the run stops with an error naming the ranks that did not finish; set it above the
    longest rollout you expect."""
    gpu_memory_utilization: float = 0.5
    """vLLM's share of GPU memory when colocated."""
    parity_threshold: float = 0.05
    """Max mean |log-prob difference| between engine and trainer after a sync before the run stops."""
    vllm_mode: Literal["colocated", "server"] = "colocated"
    """vLLM inside the training job (sleep/wake around training) or `vllm serve` on other nodes."""
    server_urls: list[str] = field(default_factory=list)
    """Server mode: one base URL per engine."""
    weight_transfer: Literal["filesystem", "nccl"] = "filesystem"
    """Server mode: how weights reach the servers (safetensors in shared_dir, or vLLM's NCCL transfer)."""
    shared_dir: str | None = None
    """Server mode with filesystem transfer: a folder both sides see."""
    sleep_level: int = 1
    """Colocated vLLM sleep level during training: 1 offloads its weights, 2 drops them."""
    hf_dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights and compute of the HF engine's model. bfloat16 on CPU stands in for a GPU engine's
    numerics (the weight sync casts; the parity probe then needs a looser ``parity_threshold``)."""
    record_routing: bool = False
    """MoE policies: the engine records the experts it routed every token to, and the first log-prob
    pass of each step logs ``moe/route_agreement`` (share of (token, layer) pairs where the trainer's
    own top-k equals the engine's). On by itself with ``loss.routing_replay``. HF engine only."""

    def __post_init__(self) -> None:
        if self.n_samples < 2:
            raise ConfigError(f"rollout.n_samples must be >= 2 for the RLOO baseline, got {self.n_samples}")
        if self.keep is not None and not 2 <= self.keep <= self.n_samples:
            raise ConfigError(f"rollout.keep must be in [2, n_samples={self.n_samples}], got {self.keep}")
        if self.temperature <= 0:
            raise ConfigError(f"rollout.temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ConfigError(f"rollout.top_k must be -1 (off) or >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p < 1.0:
            raise ConfigError(f"rollout.min_p must be in [0, 1), got {self.min_p}")
        if self.hf_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"rollout.hf_dtype must be float32 or bfloat16, got {self.hf_dtype!r}")
        if self.sleep_level not in (1, 2):
            raise ConfigError(f"rollout.sleep_level must be 1 or 2, got {self.sleep_level}")
        if self.engines_per_node is not None and self.engines_per_node < 1:
            raise ConfigError(f"rollout.engines_per_node must be >= 1 or null, got {self.engines_per_node}")
        if self.vllm_tensor_parallel_size < 1:
            raise ConfigError(
                f"rollout.vllm_tensor_parallel_size must be >= 1, got {self.vllm_tensor_parallel_size}"
            )
        if self.timeout_minutes <= 0:
            raise ConfigError(f"rollout.timeout_minutes must be > 0, got {self.timeout_minutes}")
        if self.engine == "vllm" and self.vllm_mode == "server" and not self.server_urls:
            raise ConfigError("rollout.vllm_mode=server needs rollout.server_urls (one URL per vllm serve)")


@dataclass
class EvalConfig:
    """Held-out evaluation and the inference-scaling sweep."""

    heldout_path: str | None = None
    """jsonl of held-out problems (question + answer)."""
    heldout_size: int = 500
    """Problems evaluated (the first N)."""
    n_samples: int = 1
    """Samples per problem; pass@1 is their mean."""
    temperature: float = 0.0
    """0 = greedy."""
    max_new_tokens: int = 256
    """Generation budget for evaluation."""
    eval_every: int = 0
    """RL steps between held-out evaluations (0: only at the end)."""
    eval_at_start: bool = True
    """With ``eval_every``: also evaluate the initial policy (the curve's step 0) before step 1."""
    sampled_size: int = 0
    """RL held-out evaluations also sample the first N problems once each at ``rollout.temperature`` (the
    distribution RL optimises) and log ``heldout_sampled_accuracy`` next to the greedy accuracy. 0: off."""


@dataclass
class Config:
    """The whole run: one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def records_routing(self) -> bool:
        """The rollout engine records each token's MoE routing: ``rollout.record_routing``, or
        ``loss.routing_replay`` (which replays it)."""
        return self.rollout.record_routing or self.loss.routing_replay

    def validate(self, world_size: int | None = None, *, stage: Literal["sft", "rl"] | None = None) -> None:
        """Cross-section checks that Megatron would otherwise fail on late (or hang on); with ``stage``,
        also what that training stage needs (its data, and for RL the held-out evaluation it selects
        checkpoints with)."""
        if stage is not None:
            self._validate_stage(stage)
        m, p = self.model, self.parallel
        tp, pp = p.tp, p.pp
        if m.num_attention_heads % tp:
            raise ConfigError(
                f"model.num_attention_heads ({m.num_attention_heads}) is not divisible by "
                f"parallel.tensor_model_parallel_size ({tp})"
            )
        if m.query_groups % tp:
            raise ConfigError(
                f"model.num_query_groups ({m.query_groups}) is not divisible by "
                f"parallel.tensor_model_parallel_size ({tp}): with GQA, TP can be at most the number "
                f"of key/value heads and must divide it"
            )
        if m.ffn_hidden_size % tp:
            raise ConfigError(
                f"model.ffn_hidden_size ({m.ffn_hidden_size}) is not divisible by "
                f"parallel.tensor_model_parallel_size ({tp})"
            )
        if m.num_experts is not None:
            if m.num_experts % p.ep:
                raise ConfigError(
                    f"model.num_experts ({m.num_experts}) is not divisible by "
                    f"parallel.expert_model_parallel_size ({p.ep})"
                )
            if m.expert_ffn % tp:
                raise ConfigError(
                    f"model.moe_ffn_hidden_size ({m.expert_ffn}) is not divisible by "
                    f"parallel.tensor_model_parallel_size ({tp}) (experts are TP-sharded like a dense MLP)"
                )
        elif p.ep > 1:
            raise ConfigError("parallel.expert_model_parallel_size > 1 needs model.num_experts")
        self._validate_routing()
        stages = pp * (p.virtual_pipeline_model_parallel_size or 1)
        if m.num_layers % stages:
            raise ConfigError(
                f"model.num_layers ({m.num_layers}) is not divisible by pipeline stages "
                f"(pipeline_model_parallel_size x virtual stages = {stages})"
            )
        if m.num_layers < stages:
            raise ConfigError(f"model.num_layers ({m.num_layers}) < pipeline stages ({stages})")
        if p.sequence_parallel and self.data.seq_length % tp:
            raise ConfigError(
                f"data.seq_length ({self.data.seq_length}) must be divisible by "
                f"parallel.tensor_model_parallel_size ({tp}) with parallel.sequence_parallel"
            )
        if world_size is not None:
            dp = p.data_parallel_size(world_size)
            d = self.data
            if d.global_batch_size % (d.micro_batch_size * dp):
                raise ConfigError(
                    f"data.global_batch_size ({d.global_batch_size}) is not divisible by "
                    f"data.micro_batch_size x data-parallel size = {d.micro_batch_size} x {dp}"
                )
        if self.data.seq_length > m.max_position_embeddings:
            raise ConfigError(
                f"data.seq_length ({self.data.seq_length}) > model.max_position_embeddings "
                f"({m.max_position_embeddings})"
            )

    def _validate_routing(self) -> None:
        """``rollout.record_routing`` / ``loss.routing_replay``: an MoE policy, the HF engine (vLLM's
        routed-experts output is not wired yet), and no full recomputation (the recomputed routers in
        backward would not see the replayed choice)."""
        if not self.records_routing:
            return
        what = "loss.routing_replay" if self.loss.routing_replay else "rollout.record_routing"
        if self.model.num_experts is None:
            raise ConfigError(f"{what} needs an MoE policy (model.num_experts); this model is dense")
        if self.rollout.engine != "hf":
            raise ConfigError(
                f"{what} needs rollout.engine=hf: recording the routing of a vLLM engine is not "
                f"supported yet (got rollout.engine={self.rollout.engine})"
            )
        if self.loss.routing_replay and self.model.recompute == "full":
            raise ConfigError(
                "loss.routing_replay with model.recompute=full is not supported: the routers recomputed "
                "in backward would choose their own experts; use recompute none or selective"
            )

    def _validate_stage(self, stage: str) -> None:
        if stage not in ("sft", "rl"):
            raise ValueError(f"stage must be 'sft' or 'rl', got {stage!r}")
        if not self.data.train_path:
            need = (
                "an SFT dataset (jsonl or parquet with 'messages')"
                if stage == "sft"
                else "an RL prompt set (jsonl/parquet with question + answer)"
            )
            raise ConfigError(f"data.train_path: {need} is required")
        if stage == "rl":
            ev = self.eval
            if ev.eval_every and not ev.heldout_path:
                raise ConfigError("eval.eval_every is set but eval.heldout_path is not")
            if ev.sampled_size < 0:
                raise ConfigError(f"eval.sampled_size must be >= 0, got {ev.sampled_size}")
            if self.checkpoint.keep_best and not (ev.heldout_path and ev.eval_every):
                raise ConfigError(
                    "checkpoint.keep_best selects among held-out evaluations: it needs eval.heldout_path "
                    "(a validation set) and eval.eval_every > 0"
                )


# --------------------------------------------------------------------------------------------------
# HF config.json -> ModelConfig fields
# --------------------------------------------------------------------------------------------------

_HF_ARCH = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "LlamaForCausalLM": "llama",
    "GlmForCausalLM": "glm",
}


def model_config_from_hf(path: str | os.PathLike) -> dict[str, Any]:
    """Read an HF ``config.json`` (file or folder) into :class:`ModelConfig` field values.

    Supports Qwen2/Qwen2.5 (QKV bias), Qwen3 dense (no bias, per-head q/k RMSNorm, explicit
    ``head_dim``), Qwen3-MoE (the same attention; a top-k softmax router over routed experts in every
    layer), Llama (no bias, optional tied embeddings) and GLM-4 in its transformers form
    ``GlmForCausalLM`` (QKV bias, partial rotary ``partial_rotary_factor``).
    """
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"model.hf_config: no config.json at {p}")
    try:
        hf = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    archs = hf.get("architectures") or []
    arch = next((_HF_ARCH[a] for a in archs if a in _HF_ARCH), None)
    if arch is None:
        raise ConfigError(f"{p}: unsupported architectures {archs}; supported: {sorted(_HF_ARCH)}")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        raise ConfigError(
            f"{p}: RoPE scaling {rope_type!r} is not supported yet (it would give a wrong model)"
        )
    heads = hf["num_attention_heads"]
    # transformers' Qwen3Config defaults head_dim to 128, the others to hidden / heads.
    head_dim = hf.get("head_dim") or (128 if arch in ("qwen3", "qwen3_moe") else hf["hidden_size"] // heads)
    out: dict[str, Any] = {
        "arch": arch,
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads", heads),
        "kv_channels": head_dim if head_dim * heads != hf["hidden_size"] else None,
        "vocab_size": hf["vocab_size"],
        "max_position_embeddings": hf.get("max_position_embeddings", 4096),
        "rope_theta": float(
            hf.get("rope_theta", rope.get("rope_theta", 1e4) if isinstance(rope, dict) else 1e4)
        ),
        "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "swiglu": hf.get("hidden_act", "silu") == "silu",
    }
    if arch == "qwen2":
        out["add_qkv_bias"] = True
    elif arch in ("qwen3", "qwen3_moe"):
        if hf.get("attention_bias", False):
            # Qwen3's attention_bias also covers o_proj, and its MLP has no bias: no Megatron layout.
            raise ConfigError(f"{p}: Qwen3 with attention_bias=true has no Megatron layout")
        if hf.get("use_sliding_window", False):
            raise ConfigError(f"{p}: Qwen3 sliding-window attention is not supported (it would be wrong)")
        out["add_qkv_bias"] = False
        out["qk_layernorm"] = True
        if arch == "qwen3_moe":
            out.update(_qwen3_moe_fields(hf, p))
    elif arch == "llama":
        attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            # Llama's attention_bias also covers o_proj; Megatron's add_bias_linear covers o_proj and the MLP.
            raise ConfigError(
                f"{p}: attention_bias={attn_bias} with mlp_bias={mlp_bias} has no Megatron layout"
            )
        out["add_qkv_bias"] = attn_bias
        out["add_bias_linear"] = attn_bias
    elif arch == "glm":
        out["add_qkv_bias"] = bool(hf.get("attention_bias", True))
        nested = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
        out["rotary_percent"] = float(hf.get("partial_rotary_factor", nested if nested is not None else 0.5))
    return out


def _qwen3_moe_fields(hf: dict[str, Any], p: Path) -> dict[str, Any]:
    """The MoE keys of a ``Qwen3MoeConfig``; layouts with dense layers among the MoE ones are refused."""
    if hf.get("decoder_sparse_step", 1) != 1:
        raise ConfigError(
            f"{p}: decoder_sparse_step={hf['decoder_sparse_step']} (dense layers between MoE layers) "
            "is not supported yet: only an MoE MLP in every layer"
        )
    if hf.get("mlp_only_layers"):
        raise ConfigError(
            f"{p}: mlp_only_layers={hf['mlp_only_layers']} (dense layers among MoE layers) "
            "is not supported yet"
        )
    # transformers 5 writes num_experts as num_local_experts (its attribute_map), 4.x as num_experts.
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    for key, value in (
        ("num_experts", experts),
        *((k, hf.get(k)) for k in ("num_experts_per_tok", "moe_intermediate_size")),
    ):
        if value is None:
            raise ConfigError(f"{p}: Qwen3MoeForCausalLM config has no {key!r}")
    return {
        "num_experts": experts,
        "moe_router_topk": hf["num_experts_per_tok"],
        "moe_ffn_hidden_size": hf["moe_intermediate_size"],
        "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
        "moe_aux_loss_coeff": float(hf.get("router_aux_loss_coef", 0.001)),
    }


# --------------------------------------------------------------------------------------------------
# Strict YAML loading
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; accept ints for floats and '1e-5' strings."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} does not match {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        section = where.rsplit(": ", 1)[-1] or "top level"
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} in {section} (known: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{where}{'.' if not where.endswith(': ') else ''}{name}")
        else:
            key = f"{where}{'.' if not where.endswith(': ') else ''}{name}"
            kwargs[name] = _coerce(value, tp, key)
    try:
        return cls(**kwargs)
    except ValueError as e:  # __post_init__ validation (ConfigError or a section's ValueError)
        raise ConfigError(f"{where.split(': ')[0]}: {e}") from None


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(tree: dict, overrides: list[str] | None) -> dict:
    """Apply ``a.b=c`` strings to a raw config mapping; values are parsed as YAML scalars."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def _resolve_hf(tree: dict, source: str) -> None:
    model = tree.get("model")
    if not isinstance(model, dict) or not model.get("hf_config"):
        return
    hf_path = Path(model["hf_config"])
    if not hf_path.is_absolute() and source not in ("<dict>",):
        candidate = Path(source).parent / hf_path
        hf_path = candidate if candidate.exists() else hf_path
    derived = model_config_from_hf(hf_path)
    for k, v in derived.items():
        if k in model and model[k] != v and not (isinstance(v, float) and model[k] == v):
            raise ConfigError(
                f"{source}: model.{k}={model[k]!r} disagrees with {hf_path} ({v!r}); drop one of them"
            )
        model.setdefault(k, v)


def config_from_dict(tree: dict, source: str = "<dict>") -> Config:
    """Build and validate a :class:`Config` from a raw mapping (``source`` names it in errors)."""
    _resolve_hf(tree, source)
    cfg = _build(Config, tree, f"{source}: ")
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Load YAML strictly, apply ``--set`` overrides, validate. ``path=None`` starts from defaults."""
    tree: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({e})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    apply_overrides(tree, overrides)
    return config_from_dict(tree, source)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (temp file, then rename)."""
    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
