"""Our config -> Megatron ``TransformerConfig`` + layer spec -> ``GPTModel`` chunks (+ DDP).

:func:`transformer_config` is the one function that translates :class:`megatron_t1.config.Config`
into Megatron's ``TransformerConfig``. The layer spec is TransformerEngine's when TE imports (GPU
clusters) and Megatron's local spec otherwise (CPU, laptops); both save distributed checkpoints
under the same (TE-style) keys, so a checkpoint moves between them.
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

from megatron_t1.config import Config, ConfigError


def te_available() -> bool:
    """TransformerEngine importable and a GPU present (TE layers need CUDA)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def transformer_config(cfg: Config) -> TransformerConfig:
    """The single translation from our config tree to Megatron's TransformerConfig."""
    m, p = cfg.model, cfg.parallel
    on_gpu = torch.cuda.is_available() and cfg.run.device != "cpu"
    if m.precision == "bf16" and not on_gpu:
        raise ConfigError("model.precision=bf16 needs a GPU; CPU runs use fp32")
    if p.sequence_parallel and not te_available():
        raise ConfigError("parallel.sequence_parallel needs TransformerEngine on GPU")
    bf16 = m.precision == "bf16"
    recompute = {"none": None, "full": "full", "selective": "selective"}[m.recompute]
    return TransformerConfig(
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


def layer_spec(cfg: Config):
    """TE spec when TransformerEngine is usable, the local (pure Megatron) spec otherwise."""
    if te_available():
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization=cfg.model.normalization)
    if cfg.model.core_attention == "sdpa":
        from megatron_t1.mcore.sdpa_attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def build_model(cfg: Config, *, wrap_ddp: bool = True) -> list[torch.nn.Module]:
    """Build this rank's model chunks (one, or one per virtual pipeline stage).

    Returns modules ready for the pipeline schedule: bf16 wrapped in ``Float16Module``, then
    Megatron DDP (fp32 grad buffers) when ``wrap_ddp``. ``unwrap(chunk)`` gives the ``GPTModel``.
    """
    tcfg = transformer_config(cfg)
    spec = layer_spec(cfg)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    tp = cfg.parallel.tp
    chunks: list[torch.nn.Module] = []
    for vp_stage in range(vpp or 1):
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage if vpp else None)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage if vpp else None)
        model = GPTModel(
            config=tcfg,
            transformer_layer_spec=spec,
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
