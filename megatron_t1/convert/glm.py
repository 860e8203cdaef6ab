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

from megatron_t1.convert.maps import ArchSpec, ConvertError, HFNames, decoder_hf_config


def check(mc: Any) -> None:
    if mc.add_bias_linear:
        raise ConvertError("GlmForCausalLM has no bias outside QKV: needs model.add_bias_linear=false")


def hf_config(mc: Any, dtype: str) -> dict:
    """``config.json`` of a GLM model (used when no template or stored HF config exists)."""
    return decoder_hf_config(
        mc,
        dtype,
        architecture="GlmForCausalLM",
        model_type="glm",
        partial_rotary_factor=mc.rotary_percent,
        attention_bias=mc.add_qkv_bias,
    )


SPEC = ArchSpec(
    name="glm",
    hf_architecture="GlmForCausalLM",
    names=HFNames(gate_up=("mlp.gate_up_proj",)),
    hf_config=hf_config,
    check=check,
)
