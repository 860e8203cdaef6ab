"""Qwen3 dense (``Qwen3ForCausalLM``): Llama names, no bias at all, an RMSNorm over each query and
key head (``self_attn.q_norm`` / ``k_norm``, weight ``[head_dim]``, applied before RoPE: Megatron's
``qk_layernorm``, ``self_attention.q_layernorm`` / ``k_layernorm``), and an explicit ``head_dim``
that need not be hidden / heads (Qwen3-8B: 36 layers, hidden 4096, 32 query heads of 128, 8
key/value heads, vocab 151936, untied head; Qwen3-0.6B: hidden 1024, 16 heads of 128, tied)."""

from __future__ import annotations

from typing import Any

from megatron_t1.convert.maps import ArchSpec, ConvertError, HFNames, decoder_hf_config


def check(mc: Any) -> None:
    if mc.add_qkv_bias or mc.add_bias_linear or not mc.qk_layernorm:
        raise ConvertError(
            "Qwen3ForCausalLM has q/k norms and no bias: needs model.qk_layernorm=true, "
            f"model.add_qkv_bias=false and model.add_bias_linear=false (got {mc.qk_layernorm}, "
            f"{mc.add_qkv_bias}, {mc.add_bias_linear})"
        )


def hf_config(mc: Any, dtype: str) -> dict:
    """``config.json`` of a Qwen3 model (used when no template or stored HF config exists); it always
    carries ``head_dim``, as Qwen3's default is 128, not hidden / heads."""
    return decoder_hf_config(
        mc,
        dtype,
        architecture="Qwen3ForCausalLM",
        model_type="qwen3",
        attention_bias=False,
        use_sliding_window=False,
    )


SPEC = ArchSpec(
    name="qwen3",
    hf_architecture="Qwen3ForCausalLM",
    names=HFNames(q_norm="self_attn.q_norm.weight", k_norm="self_attn.k_norm.weight"),
    hf_config=hf_config,
    check=check,
)
