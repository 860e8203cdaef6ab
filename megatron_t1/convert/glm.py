"""GLM-4 in transformers' form (``GlmForCausalLM``, the layout of ``THUDM/glm-4-9b-chat-hf``).

Differences from Llama: QKV bias, a fused ``mlp.gate_up_proj`` ``[2F, H]`` that is already Megatron's
``[gate; up]`` order (a plain copy), and rotary embeddings on the first half of each head
(``partial_rotary_factor`` 0.5) rotating *interleaved* pairs ``(x0, x1), (x2, x3), ...``; the
Megatron side uses ``rotary_interleaved=True`` and ``rotary_percent`` (see mcore/model.py), so the
q/k weights need no permutation. GLM-4-9B: 40 layers, hidden 4096, 32 query heads, 2 key/value heads
(TP <= 2), vocab 151552, untied head. ``Glm4ForCausalLM`` (extra post-norms) is not covered.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_t1.convert.maps import ArchSpec, ConvertError, Dims, HFNames, TensorMap
from megatron_t1.convert.maps import from_hf as _from_hf
from megatron_t1.convert.maps import to_hf as _to_hf


def check(mc: Any) -> None:
    if mc.add_bias_linear:
        raise ConvertError("GlmForCausalLM has no bias outside QKV: needs model.add_bias_linear=false")


def hf_config(mc: Any, dtype: str) -> dict:
    """``config.json`` of a GLM model (used when no template or stored HF config exists)."""
    return {
        "architectures": ["GlmForCausalLM"],
        "model_type": "glm",
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
        "partial_rotary_factor": mc.rotary_percent,
        "hidden_act": "silu",
        "attention_bias": mc.add_qkv_bias,
        "tie_word_embeddings": mc.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": mc.init_method_std,
        "use_cache": True,
        "torch_dtype": dtype,
    }


SPEC = ArchSpec(
    name="glm",
    hf_architecture="GlmForCausalLM",
    names=HFNames(gate_up=("mlp.gate_up_proj",)),
    hf_config=hf_config,
    check=check,
)


def tensor_maps(mc: Any, *, tp: int = 1) -> list[TensorMap]:
    return SPEC.tensor_maps(mc, tp=tp)


def from_hf(tm: TensorMap, hf_tensors: list[torch.Tensor], mc: Any) -> torch.Tensor:
    """HF tensors named ``tm.hf`` -> the full Megatron tensor ``tm.mcore``."""
    return _from_hf(tm, hf_tensors, Dims.of(mc))


def to_hf(tm: TensorMap, tensor: torch.Tensor, mc: Any) -> list[tuple[str, torch.Tensor]]:
    """The full Megatron tensor ``tm.mcore`` -> ``[(hf_name, tensor)]``; exact inverse of from_hf."""
    return _to_hf(tm, tensor, Dims.of(mc))
