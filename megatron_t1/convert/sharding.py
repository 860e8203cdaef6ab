"""Tensor-parallel split / merge and pipeline layer ranges of Megatron-Core parameters (pure torch).

TP rules (Megatron's ``ColumnParallelLinear`` / ``RowParallelLinear`` / ``VocabParallelEmbedding``):

============== ==================================================================================
rule           rank r of t holds
============== ==================================================================================
replicated     the whole tensor (norms, biases of row-parallel layers)
column         rows ``[r*R/t, (r+1)*R/t)`` (``linear_qkv``: whole KV groups, as groups are
               contiguous in Megatron's QKV layout; needs ``num_query_groups % t == 0``)
row            columns ``[r*C/t, (r+1)*C/t)`` (``linear_proj``, ``linear_fc2`` weights)
gated_column   ``[gate_r; up_r]``: the r-th row block of gate *and* of up (``linear_fc1`` with
               SwiGLU). A plain row split would give rank 0 all of gate and rank 1 all of up.
vocab          rows of the vocabulary *padded* to a multiple of ``make_vocab_size_divisible_by * t``
============== ==================================================================================

Pipeline: Megatron gives each of ``pp * vpp`` model chunks ``L / (pp * vpp)`` consecutive layers;
chunk ``(pp_rank, vp_stage)`` starts at ``vp_stage * L / vpp + pp_rank * L / (pp * vpp)``
(``megatron.core.transformer.transformer_layer.get_transformer_layer_offset`` without uneven
first/last stages).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from megatron_t1.convert.maps import ConvertError, Dims, TPRule

_LAYER = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")


def tp_rule(mcore_name: str, *, gated: bool = True) -> TPRule:
    """The TP rule of a Megatron parameter name (local-spec names; any layer index or prefix)."""
    if mcore_name.endswith(("word_embeddings.weight", "output_layer.weight")):
        return "vocab"
    if mcore_name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return "column"
    if mcore_name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        return "gated_column" if gated else "column"
    if mcore_name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "row"
    if mcore_name.endswith(
        ("layernorm.weight", "layer_norm_weight", "linear_proj.bias", "linear_fc2.bias", "layernorm.bias")
    ):
        return "replicated"
    raise ConvertError(f"no tensor-parallel rule for Megatron tensor {mcore_name}")


def _blocks(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ConvertError(f"{what}: size {n} is not divisible by tensor parallel size {tp}")
    return n // tp


def split_tp(full: torch.Tensor, rule: TPRule, tp: int, *, name: str = "tensor") -> list[torch.Tensor]:
    """Full tensor -> the ``tp`` rank shards (views where the layout allows)."""
    if tp == 1 or rule == "replicated":
        return [full] * tp
    if rule in ("column", "vocab"):
        return list(full.split(_blocks(full.shape[0], tp, name), dim=0))
    if rule == "row":
        return list(full.split(_blocks(full.shape[-1], tp, name), dim=-1))
    if rule == "gated_column":
        gate, up = full.chunk(2, dim=0)
        step = _blocks(gate.shape[0], tp, name)
        return [torch.cat([g, u], dim=0) for g, u in zip(gate.split(step), up.split(step))]
    raise ConvertError(f"{name}: unknown TP rule {rule!r}")


def shard_tp(full: torch.Tensor, rule: TPRule, tp: int, rank: int, *, name: str = "tensor") -> torch.Tensor:
    """The shard of ``rank`` (``0 <= rank < tp``)."""
    if not 0 <= rank < tp:
        raise ConvertError(f"{name}: TP rank {rank} outside [0, {tp})")
    return split_tp(full, rule, tp, name=name)[rank]


def merge_tp(shards: Sequence[torch.Tensor], rule: TPRule, *, name: str = "tensor") -> torch.Tensor:
    """Inverse of :func:`split_tp`: rank shards (in rank order) -> the full tensor."""
    if len(shards) == 1 or rule == "replicated":
        return shards[0]
    if rule in ("column", "vocab"):
        return torch.cat(list(shards), dim=0)
    if rule == "row":
        return torch.cat(list(shards), dim=-1)
    if rule == "gated_column":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ConvertError(f"{name}: unknown TP rule {rule!r}")


def check_layout(mc: Any, *, tp: int = 1, pp: int = 1, vpp: int | None = None, ep: int = 1) -> None:
    """Raise :class:`ConvertError` naming the first size that the layout cannot split (``ep``: expert
    parallel size; experts keep TP, so their width must split over TP too)."""
    d = Dims.of(mc, tp=tp)
    if tp < 1 or pp < 1 or ep < 1:
        raise ConvertError(f"--tp, --pp and --ep must be >= 1, got tp={tp} pp={pp} ep={ep}")
    sizes = [
        ("num_attention_heads", d.heads),
        ("num_query_groups (key/value heads)", d.groups),
        ("ffn_hidden_size", d.ffn),
        ("padded vocab size", d.padded_vocab),
    ]
    if d.experts:
        sizes.append(("moe_ffn_hidden_size (expert width)", d.expert_ffn))
    for what, n in sizes:
        if n % tp:
            raise ConvertError(f"model {what}={n} is not divisible by tensor parallel size {tp}")
    if ep > 1 and (d.experts or 0) % ep:
        raise ConvertError(f"model num_experts={d.experts} is not divisible by expert parallel size {ep}")
    stages = pp * (vpp or 1)
    if d.layers % stages:
        raise ConvertError(f"model num_layers={d.layers} is not divisible by {stages} pipeline stages")


def layer_offset(
    num_layers: int, pp: int, pp_rank: int, vpp: int | None = None, vp_stage: int | None = None
) -> int:
    """Global index of the first layer of model chunk ``(pp_rank, vp_stage)``."""
    chunks = pp * (vpp or 1)
    if num_layers % chunks:
        raise ConvertError(f"num_layers={num_layers} is not divisible by {chunks} pipeline chunks")
    per_chunk = num_layers // chunks
    vp = vp_stage or 0
    return vp * (num_layers // (vpp or 1)) + pp_rank * per_chunk


def layer_range(
    num_layers: int, pp: int, pp_rank: int, vpp: int | None = None, vp_stage: int | None = None
) -> range:
    """Global layer indices of model chunk ``(pp_rank, vp_stage)``."""
    start = layer_offset(num_layers, pp, pp_rank, vpp, vp_stage)
    return range(start, start + num_layers // (pp * (vpp or 1)))


def layer_index(name: str) -> int | None:
    """The layer index in ``...decoder.layers.{i}....``, or None for non-layer tensors."""
    m = _LAYER.match(name)
    return int(m.group(2)) if m else None


def shift_layer(name: str, offset: int) -> str:
    """Add ``offset`` to the layer index of a name (local -> global with the chunk's offset, or back
    with a negative one); names without a layer index are returned as they are."""
    m = _LAYER.match(name)
    if not m:
        return name
    return f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}"


_EXPERT = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")


def expert_index(name: str) -> int | None:
    """The expert index in a ``SequentialMLP`` name (``...mlp.experts.local_experts.E....``), else None."""
    m = _EXPERT.match(name)
    return int(m.group(2)) if m else None


def shift_expert(name: str, offset: int) -> str:
    """Add ``offset`` to the expert index of a ``SequentialMLP`` name (this EP rank's local experts
    -> global experts: offset = EP rank x experts per rank); other names are returned as they are."""
    m = _EXPERT.match(name)
    if not m:
        return name
    return f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}"


_GROUPED_EXPERT = re.compile(r"^(.*\.mlp\.experts\.)(linear_fc[12])\.(weight|bias)(\d+)$")


def sequential_expert_name(name: str) -> str:
    """A ``TEGroupedMLP`` parameter name -> the ``SequentialMLP`` name of the same tensor; other names
    are returned as they are.

    TE's grouped linears keep local expert ``e``'s matrix as ``weight{e}`` (``bias{e}``) of one module:
    ``...mlp.experts.linear_fc1.weight3`` is ``...mlp.experts.local_experts.3.linear_fc1.weight``, the
    same ``[rows / TP, cols]`` shard with the same ``[gate_r; up_r]`` row order (both modules save one
    distributed checkpoint, ``experts.py``), so the maps need the sequential names only.
    """
    m = _GROUPED_EXPERT.match(name)
    if not m:
        return name
    return f"{m.group(1)}local_experts.{m.group(4)}.{m.group(2)}.{m.group(3)}"
