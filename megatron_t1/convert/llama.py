"""Llama (``LlamaForCausalLM``): no biases by default (``attention_bias`` adds q/k/v/o biases,
``mlp_bias`` gate/up/down biases), tied embeddings in the small models (Llama-3.2-1B/3B)."""

from __future__ import annotations

from typing import Any

from megatron_t1.convert.maps import ArchSpec, ConvertError, HFNames, decoder_hf_config


def check(mc: Any) -> None:
    # Megatron has one switch for the QKV bias and one for every other linear layer; HF Llama has
    # one for attention (q/k/v/o) and one for the MLP. Only the equal pairs map exactly.
    if mc.add_qkv_bias != mc.add_bias_linear:
        raise ConvertError(
            "LlamaForCausalLM maps exactly only with attention_bias == mlp_bias (Megatron: "
            f"add_qkv_bias == add_bias_linear), got add_qkv_bias={mc.add_qkv_bias}, "
            f"add_bias_linear={mc.add_bias_linear}"
        )


def hf_config(mc: Any, dtype: str) -> dict:
    """``config.json`` of a Llama model (used when no template or stored HF config exists)."""
    return decoder_hf_config(
        mc,
        dtype,
        architecture="LlamaForCausalLM",
        model_type="llama",
        attention_bias=mc.add_qkv_bias,
        mlp_bias=mc.add_bias_linear,
    )


SPEC = ArchSpec(
    name="llama", hf_architecture="LlamaForCausalLM", names=HFNames(), hf_config=hf_config, check=check
)
