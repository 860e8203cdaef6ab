"""Llama (``LlamaForCausalLM``): no biases by default (``attention_bias`` adds q/k/v/o biases,
``mlp_bias`` gate/up/down biases), tied embeddings in the small models (Llama-3.2-1B/3B)."""

from __future__ import annotations

from typing import Any

import torch

from megatron_t1.convert.maps import ArchSpec, ConvertError, Dims, HFNames, TensorMap
from megatron_t1.convert.maps import from_hf as _from_hf
from megatron_t1.convert.maps import to_hf as _to_hf


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
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": mc.hidden_size,
        "intermediate_size": mc.ffn_hidden_size,
        "num_hidden_layers": mc.num_layers,
        "num_attention_heads": mc.num_attention_heads,
        "num_key_value_heads": mc.num_query_groups or mc.num_attention_heads,
        "head_dim": mc.kv_channels or mc.hidden_size // mc.num_attention_heads,
        "vocab_size": mc.vocab_size,
        "max_position_embeddings": mc.max_position_embeddings,
        "rms_norm_eps": mc.norm_epsilon,
        "rope_theta": mc.rope_theta,
        "hidden_act": "silu",
        "attention_bias": mc.add_qkv_bias,
        "mlp_bias": mc.add_bias_linear,
        "tie_word_embeddings": mc.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": mc.init_method_std,
        "use_cache": True,
        "torch_dtype": dtype,
    }


SPEC = ArchSpec(
    name="llama", hf_architecture="LlamaForCausalLM", names=HFNames(), hf_config=hf_config, check=check
)


def tensor_maps(mc: Any, *, tp: int = 1) -> list[TensorMap]:
    return SPEC.tensor_maps(mc, tp=tp)


def from_hf(tm: TensorMap, hf_tensors: list[torch.Tensor], mc: Any) -> torch.Tensor:
    """HF tensors named ``tm.hf`` -> the full Megatron tensor ``tm.mcore``."""
    return _from_hf(tm, hf_tensors, Dims.of(mc))


def to_hf(tm: TensorMap, tensor: torch.Tensor, mc: Any) -> list[tuple[str, torch.Tensor]]:
    """The full Megatron tensor ``tm.mcore`` -> ``[(hf_name, tensor)]``; exact inverse of from_hf."""
    return _to_hf(tm, tensor, Dims.of(mc))
