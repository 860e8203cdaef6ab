"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): Llama names, QKV bias, no other bias, untied head for the
large models (Qwen2.5-32B: 64 layers, hidden 5120, 40 query heads, 8 key/value heads, vocab 152064)."""

from __future__ import annotations

from typing import Any

from megatron_t1.convert.maps import ArchSpec, ConvertError, HFNames, decoder_hf_config


def check(mc: Any) -> None:
    if not mc.add_qkv_bias or mc.add_bias_linear:
        raise ConvertError(
            "Qwen2ForCausalLM has a QKV bias and no other bias: needs model.add_qkv_bias=true and "
            f"model.add_bias_linear=false (got {mc.add_qkv_bias}, {mc.add_bias_linear})"
        )


def hf_config(mc: Any, dtype: str) -> dict:
    """``config.json`` of a Qwen2 model (used when no template or stored HF config exists)."""
    cfg = decoder_hf_config(mc, dtype, architecture="Qwen2ForCausalLM", model_type="qwen2")
    cfg["use_sliding_window"] = False
    if cfg["head_dim"] * mc.num_attention_heads == mc.hidden_size:
        del cfg["head_dim"]  # Qwen2's own default; written only when it differs
    return cfg


SPEC = ArchSpec(
    name="qwen2", hf_architecture="Qwen2ForCausalLM", names=HFNames(), hf_config=hf_config, check=check
)
