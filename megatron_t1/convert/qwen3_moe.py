"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen3's attention (no bias, per-head q/k RMSNorm, explicit
``head_dim``) and in every layer a sparse MLP: a router ``mlp.gate`` ``[experts, H]`` (softmax over all
experts, top ``num_experts_per_tok``, renormalised when ``norm_topk_prob``) and ``num_experts``
gated experts ``mlp.experts.E.{gate,up,down}_proj`` of width ``moe_intermediate_size``, no shared
expert (Qwen3-30B-A3B: 48 layers, hidden 2048, 32 query heads of 128, 4 key/value heads, 128 experts
of 768, top 8). Megatron side: the MoE layer with a ``SequentialMLP`` (see :mod:`maps`)."""

from __future__ import annotations

from typing import Any

from megatron_t1.convert import qwen3
from megatron_t1.convert.maps import ArchSpec, ConvertError, HFNames


def check(mc: Any) -> None:
    qwen3.check(mc)
    if mc.num_experts is None:
        raise ConvertError("Qwen3MoeForCausalLM needs model.num_experts (a dense model is Qwen3ForCausalLM)")


def hf_config(mc: Any, dtype: str) -> dict:
    """``config.json`` of a Qwen3-MoE model (used when no template or stored HF config exists): Qwen3's,
    plus the MoE keys (an MoE MLP in every layer)."""
    moe = {
        "num_experts": mc.num_experts,
        "num_experts_per_tok": mc.moe_router_topk,
        "moe_intermediate_size": mc.expert_ffn,
        "norm_topk_prob": mc.norm_topk_prob,
        "router_aux_loss_coef": mc.moe_aux_loss_coeff,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }
    return (
        qwen3.hf_config(mc, dtype)
        | {"architectures": [SPEC.hf_architecture], "model_type": "qwen3_moe"}
        | moe
    )


SPEC = ArchSpec(
    name="qwen3_moe",
    hf_architecture="Qwen3MoeForCausalLM",
    names=HFNames(
        q_norm="self_attn.q_norm.weight", k_norm="self_attn.k_norm.weight", router="mlp.gate.weight"
    ),
    hf_config=hf_config,
    check=check,
)
