"""Our config -> Megatron ``TransformerConfig`` + layer spec -> ``GPTModel`` chunks (+ DDP).

:func:`transformer_config` is the one function that translates :class:`megatron_t1.config.Config`
into Megatron's ``TransformerConfig``. The layer spec is TransformerEngine's when TE imports (GPU
clusters) and Megatron's local spec otherwise (CPU, laptops); both save distributed checkpoints
under the same (TE-style) keys, so a checkpoint moves between them.

Sequence parallelism works with both. The local spec's norms are :class:`TorchNorm` (torch's
RMSNorm / LayerNorm, as Megatron's ``WrappedTorchNorm``, which refuses SP): under SP each TP rank
normalises its own slice of the sequence, so the norm weights are marked ``sequence_parallel`` and
``finalize_model_grads`` sums their gradients over the TP group, as TE's and apex's norms are.

The q/k norms of ``model.qk_layernorm`` (Qwen3) are :class:`TorchNorm` s of ``kv_channels`` too. They
act on the heads after ``linear_qkv``, i.e. on the full sequence of this rank's heads, so SP is no
reason to reduce them; but each TP rank sees only its own heads, so their gradients are partial sums
all the same: ``finalize_model_grads`` sums every parameter named ``q_layernorm`` / ``k_layernorm``
over TP when ``TransformerConfig.qk_layernorm`` is set (one sum, also when SP marks them: it is one
``elif`` with an ``or``), as it does for TE's q/k ``TENorm``, which are marked like ours.

Packed micro-batches come in two layouts (:mod:`megatron_t1.data.packing`); which core attention
honours which is :func:`check_packed_layout`'s table, checked when the model is built and for every
batch (:func:`megatron_t1.mcore.forward.model_forward`).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_t1.config import Config, ConfigError
from megatron_t1.mcore.cpu import fill_moe_te_gap


def te_available() -> bool:
    """TransformerEngine importable and a GPU present (TE layers need CUDA)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def te_grouped_linear_available() -> bool:
    """TE is usable (:func:`te_available`) and Megatron-Core found its ``GroupedLinear`` (TE >= 1.9)."""
    if not te_available():
        return False
    from megatron.core.extensions import transformer_engine as mte

    return getattr(mte, "TEColumnParallelGroupedLinear", None) is not None


def uses_grouped_gemm(cfg: Config) -> bool:
    """Whether the experts of ``cfg``'s MoE layers run as TE grouped GEMMs (``TEGroupedMLP``), per
    ``model.moe_grouped_gemm``; raises a ``ConfigError`` when it is true and TE's grouped linears are
    missing. Always False for a dense model."""
    m = cfg.model
    if m.num_experts is None or m.moe_grouped_gemm is False:
        return False
    have = te_grouped_linear_available()
    if m.moe_grouped_gemm and not have:
        why = "no GPU" if not torch.cuda.is_available() else "no TransformerEngine with GroupedLinear"
        raise ConfigError(
            f"model.moe_grouped_gemm=true needs TransformerEngine's GroupedLinear on a GPU ({why}); "
            "set it to null (grouped when available) or false (one GEMM per expert)"
        )
    return have


def transformer_config(cfg: Config) -> TransformerConfig:
    """The single translation from our config tree to Megatron's TransformerConfig."""
    m, p = cfg.model, cfg.parallel
    on_gpu = torch.cuda.is_available() and cfg.run.device != "cpu"
    if m.precision == "bf16" and not on_gpu:
        raise ConfigError("model.precision=bf16 needs a GPU; CPU runs use fp32")
    bf16 = m.precision == "bf16"
    recompute = {"none": None, "full": "full", "selective": "selective"}[m.recompute]
    return TransformerConfig(
        **_moe_fields(cfg),
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.query_groups,
        kv_channels=m.kv_channels,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layernorm_epsilon=m.norm_epsilon,
        normalization=m.normalization,
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else F.gelu,
        # GLM-4 (transformers' GlmForCausalLM) rotates interleaved pairs; Qwen2/Llama rotate halves.
        rotary_interleaved=m.arch == "glm",
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # Megatron's per-token loss mode: the loss function returns (sum, tokens) and gradients are
        # divided by the token count of the whole global batch (token-mean, not a mean of means).
        calculate_per_token_loss=True,
        # Fusions that need apex / TE kernels stay off unless TE is there.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        attention_softmax_in_fp32=True,
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        variable_seq_lengths=False,
    )


def _moe_fields(cfg: Config) -> dict:
    """The MoE part of :func:`transformer_config` (empty for a dense model).

    Qwen3-MoE's router is softmax over all experts, top-k, and with ``norm_topk_prob`` the k weights
    divided by their sum. Megatron's softmax router has two orders (``topk_routing_with_score_function``):
    ``moe_router_pre_softmax=False`` takes the top-k *logits* and softmaxes those, which is
    ``p_i / sum_topk p_j``, the renormalised form; ``pre_softmax=True`` softmaxes over all experts and
    keeps the k probabilities, the form without renormalisation. No scaling factor, no expert bias,
    no group-limited routing, no shared expert.
    """
    m, p = cfg.model, cfg.parallel
    if m.num_experts is None:
        return {}
    return dict(
        num_moe_experts=m.num_experts,
        moe_router_topk=m.moe_router_topk,
        moe_ffn_hidden_size=m.expert_ffn,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not m.norm_topk_prob,
        moe_router_topk_scaling_factor=None,
        moe_router_load_balancing_type="aux_loss" if m.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=uses_grouped_gemm(cfg),
        expert_model_parallel_size=p.ep,
        moe_enable_routing_replay=cfg.loss.routing_replay,  # each router gets a RouterReplay (mcore/moe.py)
    )


class TorchNorm:
    """torch's ``RMSNorm`` / ``LayerNorm`` for the local spec, sequence parallel allowed (module docstring).

    Same constructor as Megatron's norms; returns the plain torch module (so checkpoints keep the
    keys of Megatron's ``WrappedTorchNorm``), its parameters marked ``sequence_parallel`` under SP.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.layernorm_zero_centered_gamma or config.memory_efficient_layer_norm:
            raise ValueError("TorchNorm: zero-centred gamma and memory-efficient layer norm need TE or apex")
        kinds = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
        if config.normalization not in kinds:
            raise ValueError(f"TorchNorm: normalization {config.normalization!r} is not supported")
        norm = kinds[config.normalization](normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


ATTENTION_LAYOUTS = {"te": ("thd",), "sdpa": ("thd", "mask"), "megatron": ("mask",)}
"""Packed layouts each core attention honours. TE's spec uses a causal mask type, under which a dense
block-diagonal mask is not applied (documents would attend across boundaries); Megatron's unfused
``DotProductAttention`` has no THD path."""


def attention_kind_of(cfg: Config) -> str:
    """ "te", "sdpa" or "megatron": the core attention :func:`layer_spec` builds for ``cfg``."""
    return "te" if te_available() else cfg.model.core_attention


def check_packed_layout(kind: str, layout: str) -> None:
    """Raise a one-line ``ConfigError`` when core attention ``kind`` cannot keep ``layout``'s packed
    documents apart (:data:`ATTENTION_LAYOUTS`)."""
    if kind not in ATTENTION_LAYOUTS:
        raise ValueError(f"unknown core attention {kind!r}")
    if layout not in ATTENTION_LAYOUTS[kind]:
        fix = "data.packing=thd" if "thd" in ATTENTION_LAYOUTS[kind] else "model.core_attention=sdpa"
        raise ConfigError(
            f"packed rows in the {layout!r} layout would reach {kind} core attention, which does not keep "
            f"their documents apart (log-probs would be wrong); use {fix}"
        )


def packed_layout(cfg: Config) -> str:
    """The packed layout of this run: ``data.packing``, or with "auto" THD unless the core attention
    is Megatron's unfused one; checked against the attention (:func:`check_packed_layout`)."""
    kind = attention_kind_of(cfg)
    layout = cfg.data.packing
    if layout == "auto":
        layout = "thd" if "thd" in ATTENTION_LAYOUTS[kind] else "mask"
    check_packed_layout(kind, layout)
    return layout


def attention_kind(model: torch.nn.Module) -> str:
    """The core attention ``model`` was built with ("te", "sdpa" or "megatron"), from its modules."""
    gpt = unwrap(model)
    kind = getattr(gpt, "_t1_attention_kind", None)
    if kind is None:
        names = {type(m).__name__ for n, m in gpt.named_modules() if n.endswith("core_attention")}
        kind = "sdpa" if "SDPAttention" in names else "megatron" if "DotProductAttention" in names else "te"
        gpt._t1_attention_kind = kind
    return kind


def layer_spec(cfg: Config):
    """TE spec when TransformerEngine is usable, the local (pure Megatron) spec otherwise."""
    qk, experts = cfg.model.qk_layernorm, cfg.model.num_experts
    if te_available():
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, qk_layernorm=qk, moe_grouped_gemm=uses_grouped_gemm(cfg)
        )
    if experts is not None:
        fill_moe_te_gap()  # megatron-core 0.16.1's MoE router without TE (mcore/cpu.py, patch 9)
    spec = get_gpt_layer_local_spec(
        num_experts=experts, moe_grouped_gemm=False, normalization=cfg.model.normalization, qk_layernorm=qk
    )
    spec.submodules.input_layernorm = TorchNorm
    spec.submodules.pre_mlp_layernorm = TorchNorm
    if qk:  # Megatron's local choice, WrappedTorchNorm, refuses sequence parallelism
        spec.submodules.self_attention.submodules.q_layernorm = TorchNorm
        spec.submodules.self_attention.submodules.k_layernorm = TorchNorm
    if cfg.model.core_attention == "sdpa":
        from megatron_t1.mcore.sdpa_attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def _block_spec(spec, tcfg: TransformerConfig, vp_stage: int | None):
    """The local spec as a whole block, so that the final norm is a :class:`TorchNorm` too."""
    if te_available():
        return spec
    return TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(tcfg, vp_stage=vp_stage), layer_norm=TorchNorm
    )


def build_model(cfg: Config, *, wrap_ddp: bool = True) -> list[torch.nn.Module]:
    """Build this rank's model chunks (one, or one per virtual pipeline stage).

    Returns modules ready for the pipeline schedule: bf16 wrapped in ``Float16Module``, then
    Megatron DDP (fp32 grad buffers) when ``wrap_ddp``. ``unwrap(chunk)`` gives the ``GPTModel``.
    """
    tcfg = transformer_config(cfg)
    packed_layout(cfg)  # a layout the attention would get wrong fails here, before any step
    spec = layer_spec(cfg)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    tp = cfg.parallel.tp
    chunks: list[torch.nn.Module] = []
    for vp_stage in range(vpp or 1):
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage if vpp else None)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage if vpp else None)
        model = GPTModel(
            config=tcfg,
            transformer_layer_spec=_block_spec(spec, tcfg, vp_stage if vpp else None),
            vocab_size=cfg.model.padded_vocab_size(tp),
            max_sequence_length=cfg.model.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=cfg.model.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_percent=cfg.model.rotary_percent,
            rotary_base=int(cfg.model.rope_theta),
            vp_stage=vp_stage if vpp else None,
        )
        if torch.cuda.is_available() and cfg.run.device != "cpu":
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    if cfg.model.precision == "bf16":
        chunks = [Float16Module(tcfg, c) for c in chunks]
    if wrap_ddp:
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            check_for_nan_in_grad=False,
        )
        chunks = [
            DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
            for i, c in enumerate(chunks)
        ]
        for c in chunks:
            c.broadcast_params()  # identical replicas across DP from step 0
    return chunks


def unwrap(module: torch.nn.Module) -> GPTModel:
    """Strip DDP / Float16Module wrappers."""
    while not isinstance(module, GPTModel):
        module = module.module
    return module
