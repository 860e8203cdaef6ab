"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): Llama names, QKV bias, no other bias, untied head for the
large models (Qwen2.5-32B: 64 layers, hidden 5120, 40 query heads, 8 key/value heads, vocab 152064)."""

from __future__ import annotations

from typing import Any

import torch

from megatron_t1.convert.maps import ArchSpec, ConvertError, Dims, HFNames, TensorMap
from megatron_t1.convert.maps import from_hf as _from_hf
from megatron_t1.convert.maps import to_hf as _to_hf


def check(mc: Any) -> None:
    if not mc.add_qkv_bias or mc.add_bias_linear:
        raise ConvertError(
            "Qwen2ForCausalLM has a QKV bias and no other bias: needs model.add_qkv_bias=true and "
            f"model.add_bias_linear=false (got {mc.add_qkv_bias}, {mc.add_bias_linear})"
        )


def hf_config(mc: Any, dtype: str) -> dict:
    """``config.json`` of a Qwen2 model (used when no template or stored HF config exists)."""
    head_dim = mc.kv_channels or mc.hidden_size // mc.num_attention_heads
    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": mc.hidden_size,
        "intermediate_size": mc.ffn_hidden_size,
        "num_hidden_layers": mc.num_layers,
        "num_attention_heads": mc.num_attention_heads,
        "num_key_value_heads": mc.num_query_groups or mc.num_attention_heads,
        "vocab_size": mc.vocab_size,
        "max_position_embeddings": mc.max_position_embeddings,
        "rms_norm_eps": mc.norm_epsilon,
        "rope_theta": mc.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": mc.tie_word_embeddings,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "initializer_range": mc.init_method_std,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if head_dim * mc.num_attention_heads != mc.hidden_size:
        cfg["head_dim"] = head_dim
    return cfg


SPEC = ArchSpec(
    name="qwen2", hf_architecture="Qwen2ForCausalLM", names=HFNames(), hf_config=hf_config, check=check
)


def tensor_maps(mc: Any, *, tp: int = 1) -> list[TensorMap]:
    return SPEC.tensor_maps(mc, tp=tp)


def from_hf(tm: TensorMap, hf_tensors: list[torch.Tensor], mc: Any) -> torch.Tensor:
    """HF tensors named ``tm.hf`` -> the full Megatron tensor ``tm.mcore``."""
    return _from_hf(tm, hf_tensors, Dims.of(mc))


def to_hf(tm: TensorMap, tensor: torch.Tensor, mc: Any) -> list[tuple[str, torch.Tensor]]:
    """The full Megatron tensor ``tm.mcore`` -> ``[(hf_name, tensor)]``; exact inverse of from_hf."""
    return _to_hf(tm, tensor, Dims.of(mc))
