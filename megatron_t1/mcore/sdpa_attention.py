"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for the local layer spec.

Megatron's local ``DotProductAttention`` materialises the [b, heads, s, s] scores, masks them in
place, runs a separate softmax and keeps the probabilities for backward. On CPU that is ~40% of a
tiny model's step; on a GPU without TransformerEngine it is what runs out of memory at seq 4096
(bench/RESULTS.md). :class:`SDPAttention` is a drop-in ``core_attention`` module (same constructor
and forward signature) that hands the whole thing to SDPA, which picks a fused kernel: flash or
memory-efficient attention on GPU, the flash CPU kernel on CPU.

Semantics kept from ``DotProductAttention``:

- inputs ``query`` [sq, b, np, hn], ``key`` / ``value`` [sk, b, ng, hn] (GQA: ng divides np);
  output [sq, b, np * hn];
- ``attention_mask`` is Megatron's boolean mask, True = *masked out*, broadcastable to
  [b, np, sq, sk]; ``None`` with a causal mask type means plain causal attention;
- the softmax scale is ``1 / sqrt(hn)`` (or ``softmax_scale``); query-key layer scaling only changes
  how Megatron splits that scale between the matmul and an fp32 softmax, so the product is the same;
- attention dropout runs under the model-parallel RNG tracker, as Megatron's does.

Packed THD sequences (``packed_seq_params.qkv_format == "thd"``, the default layout of packed rows:
:mod:`megatron_t1.data.packing`): Megatron squeezes the batch dimension, so ``query`` is [t, np, hn]
and the documents are the slices ``cu_seqlens[i]:cu_seqlens[i+1]``. Each document runs as its own
causal SDPA call, so no [t, t] mask or score tensor exists and no token attends across a boundary;
the output is [t, np * hn].

Not supported (an error at construction, never a silent difference): sliding-window attention,
off-by-one / learnable softmax, context parallelism, THD with different query and key offsets
(cross attention, padded THD for context parallelism).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """``core_attention`` for ``get_gpt_layer_local_spec`` backed by SDPA (see the module docstring)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention: context parallelism needs TransformerEngine's attention")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("SDPAttention: sliding-window attention is not supported; use the Megatron core")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SDPAttention: softmax_type={config.softmax_type!r} is not supported")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention: attention_bias is not supported")
        p = self.dropout_p if self.training else 0.0
        if packed_seq_params is not None:
            return self._thd(query, key, value, attention_mask, packed_seq_params, p)
        sq, b = query.shape[0], query.shape[1]
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        k, v = self._expand_kv(k, v)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal and sq > 1
        allowed = None if attention_mask is None else ~attention_mask  # Megatron: True = masked out
        with self._dropout_rng(p):
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=p, is_causal=causal, scale=self.softmax_scale
            )
        # [b, n, sq, hn] -> [sq, b, n * hn]
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, self.heads * self.head_dim)

    def _thd(self, query, key, value, attention_mask, params, p: float) -> torch.Tensor:
        """Packed THD: query [t, np, hn], key / value [t, ng, hn] -> [t, np * hn], one causal block
        per document of ``params.cu_seqlens_q``."""
        if params.qkv_format != "thd":
            raise ValueError(f"SDPAttention: packed qkv_format {params.qkv_format!r} is not supported")
        if attention_mask is not None:
            raise ValueError(
                "SDPAttention: a packed THD batch carries no attention_mask; pass one or the other"
            )
        cu = params.cu_seqlens_q
        same_kv = (
            params.cu_seqlens_kv is None
            or params.cu_seqlens_kv is cu
            or torch.equal(params.cu_seqlens_kv, cu)
        )
        if not same_kv or params.cu_seqlens_q_padded is not None:
            raise ValueError("SDPAttention: THD needs equal query and key offsets and no padded offsets")
        t = query.shape[0]
        bounds = cu.tolist()
        if bounds[0] != 0 or bounds[-1] != t:
            raise ValueError(
                f"SDPAttention: cu_seqlens span [{bounds[0]}, {bounds[-1]}], the packed batch has {t} tokens"
            )
        # [t, n, hn] -> [1, n, t, hn]
        q, k, v = (x.transpose(0, 1)[None] for x in (query, key, value))
        k, v = self._expand_kv(k, v)
        out = torch.empty_like(q)
        with self._dropout_rng(p):
            for s0, s1 in zip(bounds[:-1], bounds[1:]):
                if s1 > s0:
                    out[:, :, s0:s1] = F.scaled_dot_product_attention(
                        q[:, :, s0:s1],
                        k[:, :, s0:s1],
                        v[:, :, s0:s1],
                        dropout_p=p,
                        is_causal=s1 - s0 > 1,
                        scale=self.softmax_scale,
                    )
        # [1, n, t, hn] -> [t, n * hn]
        return out[0].transpose(0, 1).reshape(t, self.heads * self.head_dim)

    def _expand_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GQA: repeat the K/V heads (dim 1) to the query heads (enable_gqa is not in every kernel)."""
        if self.groups == self.heads:
            return k, v
        rep = self.heads // self.groups
        return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)

    def _dropout_rng(self, p: float):
        """Attention dropout draws from Megatron's model-parallel RNG tracker, as its attention does."""
        return tensor_parallel.get_cuda_rng_tracker().fork() if p > 0 else contextlib.nullcontext()
