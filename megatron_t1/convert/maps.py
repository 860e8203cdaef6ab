"""Per-tensor maps between HF (transformers) and Megatron-Core parameter names and layouts.

Pure torch: no megatron import. Every architecture module (qwen2, qwen3, qwen3_moe, llama, glm)
describes its HF names with :class:`HFNames`; :func:`decoder_maps` turns them and a
:class:`~megatron_t1.config.ModelConfig` into the list of :class:`TensorMap` s, one per *full*
Megatron tensor (TP-merged, global layer index, the names of a TP=1 ``GPTModel`` built with the
local spec), and :func:`from_hf` / :func:`to_hf` move the data. They are exact inverses:
``to_hf(from_hf(x)) == x`` bit for bit, and ``from_hf(to_hf(y)) == y`` except for the padded
vocabulary rows, which HF does not have (they come back as zeros).

Layouts that differ between the two sides (the classic conversion bugs):

* **QKV** (``kind="qkv"``). HF has ``q_proj`` ``[nq*d, H]``, ``k_proj`` / ``v_proj`` ``[ng*d, H]``.
  Megatron's ``linear_qkv`` is ``[(nq + 2*ng)*d, H]`` ordered *per key/value group*: for each group
  g, its ``nq/ng`` query heads, then ``k_g``, then ``v_g`` (``megatron.core.transformer.attention``
  views it as ``[.., ng, (nq/ng + 2)*d]``). Biases follow the same row order. Because groups are
  contiguous, a TP split of Megatron's tensor is a plain row split.
* **Gated MLP** (``kind="gated"``). Megatron's ``linear_fc1`` is ``[2F, H]`` = ``cat(gate, up)``
  (SwiGLU computes ``silu(x W_gate) * (x W_up)``); under TP each rank holds ``[gate_r; up_r]``, so a
  naive row split is wrong (see :mod:`megatron_t1.convert.sharding`). GLM stores the fused
  ``gate_up_proj`` already in this order (``kind="copy"``).
* **MoE experts** (Qwen3-MoE). HF's ``mlp.experts.E.{gate,up,down}_proj`` are Megatron's
  ``SequentialMLP`` ``mlp.experts.local_experts.E.linear_fc1`` (``[gate_E; up_E]``, ``gated``) and
  ``linear_fc2``, each TP-sharded like a dense MLP (expert TP = TP); the router ``mlp.gate``
  ``[E, H]`` is Megatron's ``mlp.router.weight``, replicated. Names are those of ``state_dict()`` with
  EP = 1 (local expert index = global expert index).
* **Vocabulary** (``kind="vocab"``). Megatron pads rows to a multiple of
  ``make_vocab_size_divisible_by * tp``; HF has exactly ``vocab_size`` rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Kind = Literal["copy", "qkv", "gated", "vocab"]
TPRule = Literal["replicated", "column", "row", "gated_column", "vocab"]


class ConvertError(ValueError):
    """A conversion problem; the message names the tensor, file or folder at fault."""


@dataclass(frozen=True)
class Dims:
    """Sizes the maps need, read from a ModelConfig."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    vocab: int
    padded_vocab: int
    qkv_bias: bool
    linear_bias: bool
    tied: bool
    qk_layernorm: bool
    experts: int | None = None
    """Routed experts per layer; None: a dense MLP."""
    expert_ffn: int = 0
    """Inner width of one expert."""

    @classmethod
    def of(cls, mc: Any, *, tp: int = 1) -> Dims:
        """``mc``: a ModelConfig (or a Config; its ``.model`` is used)."""
        mc = getattr(mc, "model", mc)
        if not mc.swiglu:
            raise ConvertError("only gated-SiLU MLPs (model.swiglu=true) are supported by the converters")
        if mc.normalization != "RMSNorm":
            raise ConvertError(
                f"only RMSNorm models are supported, got model.normalization={mc.normalization}"
            )
        groups = mc.num_query_groups or mc.num_attention_heads
        return cls(
            layers=mc.num_layers,
            hidden=mc.hidden_size,
            ffn=mc.ffn_hidden_size,
            heads=mc.num_attention_heads,
            groups=groups,
            head_dim=mc.kv_channels or mc.hidden_size // mc.num_attention_heads,
            vocab=mc.vocab_size,
            padded_vocab=mc.padded_vocab_size(tp),
            qkv_bias=mc.add_qkv_bias,
            linear_bias=mc.add_bias_linear,
            tied=mc.tie_word_embeddings,
            qk_layernorm=mc.qk_layernorm,
            experts=mc.num_experts,
            expert_ffn=mc.expert_ffn if mc.num_experts else 0,
        )

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.groups) * self.head_dim


@dataclass(frozen=True)
class TensorMap:
    """One full Megatron tensor and the HF tensors it is made of.

    ``mcore``: name in a TP=1 GPTModel with the global layer index
    (``decoder.layers.3.self_attention.linear_qkv.weight``); ``hf``: HF names in the order
    :func:`from_hf` takes them; ``shape``: the full Megatron shape (vocab rows padded for the TP the
    maps were built for); ``tp``: how Megatron shards it over TP ranks; ``layer``: global layer
    index or None.
    """

    mcore: str
    hf: tuple[str, ...]
    kind: Kind
    shape: tuple[int, ...]
    tp: TPRule
    layer: int | None = None


@dataclass(frozen=True)
class HFNames:
    """HF parameter names of a Llama-style decoder (``{i}``: layer index; projections without
    ``.weight`` / ``.bias``)."""

    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    layer: str = "model.layers.{i}."
    input_norm: str = "input_layernorm.weight"
    post_attention_norm: str = "post_attention_layernorm.weight"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    q_norm: str | None = None
    """Per-head query norm weight ``[head_dim]`` (Qwen3: ``self_attn.q_norm.weight``); None: none."""
    k_norm: str | None = None
    """Per-head key norm weight ``[head_dim]``, as ``q_norm``."""
    gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    """Two names (separate gate and up) or one (a fused ``[gate; up]`` tensor, GLM)."""
    down: str = "mlp.down_proj"
    router: str | None = None
    """MoE router weight ``[experts, H]`` (Qwen3-MoE: ``mlp.gate.weight``); None: no MoE layout."""
    expert: str = "mlp.experts.{e}."
    """Prefix of expert ``{e}``'s projections ``expert_gate_up`` / ``expert_down``."""
    expert_gate_up: tuple[str, ...] = ("gate_proj", "up_proj")
    expert_down: str = "down_proj"
    ignored: tuple[str, ...] = (r".*\.rotary_emb\.inv_freq$",)
    """Regexes of HF tensors that carry no weights (old checkpoints saved RoPE buffers)."""


@dataclass(frozen=True)
class ArchSpec:
    """One HF architecture: its names, and how to write its ``config.json`` from a ModelConfig."""

    name: str
    """Our family name (``ModelConfig.arch``)."""
    hf_architecture: str
    """The HF ``architectures`` entry (``Qwen2ForCausalLM``)."""
    names: HFNames = field(default_factory=HFNames)
    hf_config: Callable[[Any, str], dict] | None = None
    """``(ModelConfig, torch_dtype_name) -> config.json dict`` for exports without a template."""
    check: Callable[[Any], None] | None = None
    """Raises :class:`ConvertError` when a ModelConfig has no exact HF form in this architecture."""

    def tensor_maps(self, mc: Any, *, tp: int = 1) -> list[TensorMap]:
        """The full Megatron tensors of ``mc`` (vocab padded for ``tp``), in checkpoint order."""
        mc = getattr(mc, "model", mc)
        if self.check is not None:
            self.check(mc)
        return decoder_maps(self.names, Dims.of(mc, tp=tp))

    def from_hf(self, tm: TensorMap, hf_tensors: Sequence[torch.Tensor], mc: Any) -> torch.Tensor:
        return from_hf(tm, hf_tensors, Dims.of(mc))

    def to_hf(self, tm: TensorMap, tensor: torch.Tensor, mc: Any) -> list[tuple[str, torch.Tensor]]:
        return to_hf(tm, tensor, Dims.of(mc))

    def is_ignored(self, hf_name: str) -> bool:
        return any(re.fullmatch(p, hf_name) for p in self.names.ignored)


# --------------------------------------------------------------------------------------------------
# Layout functions (work on weights [rows, H] and biases [rows] alike, and on meta tensors)
# --------------------------------------------------------------------------------------------------


def decoder_hf_config(mc: Any, dtype: str, *, architecture: str, model_type: str, **extra: Any) -> dict:
    """The ``config.json`` keys every decoder here shares (the Llama layout: RMSNorm, SwiGLU, RoPE),
    from a ModelConfig; ``extra`` adds an architecture's own keys or overrides these."""
    cfg = {
        "architectures": [architecture],
        "model_type": model_type,
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
        "tie_word_embeddings": mc.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": mc.init_method_std,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    cfg.update(extra)
    return cfg


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, heads: int, groups: int, head_dim: int):
    """HF ``q [nq*d, *r]``, ``k, v [ng*d, *r]`` -> Megatron ``[(nq + 2ng)*d, *r]`` grouped
    ``[q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1, ...]``."""
    rest = q.shape[1:]
    per = heads // groups
    q = q.reshape(groups, per * head_dim, *rest)
    k = k.reshape(groups, head_dim, *rest)
    v = v.reshape(groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per + 2) * head_dim, *rest)


def split_qkv(qkv: torch.Tensor, *, heads: int, groups: int, head_dim: int):
    """Inverse of :func:`merge_qkv`: ``[(nq + 2ng)*d, *r]`` -> ``(q, k, v)`` contiguous."""
    rest = qkv.shape[1:]
    per = heads // groups
    x = qkv.reshape(groups, (per + 2) * head_dim, *rest)
    q, k, v = x.split([per * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(heads * head_dim, *rest).contiguous(),
        k.reshape(groups * head_dim, *rest).contiguous(),
        v.reshape(groups * head_dim, *rest).contiguous(),
    )


def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    """``[V, H]`` -> ``[padded, H]`` with zero rows appended (no copy when already padded)."""
    if t.shape[0] == padded:
        return t
    if t.shape[0] > padded:
        raise ConvertError(f"vocab rows {t.shape[0]} > padded size {padded}")
    out = t.new_zeros((padded, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


# --------------------------------------------------------------------------------------------------
# The maps of a Llama-style decoder
# --------------------------------------------------------------------------------------------------


def decoder_maps(n: HFNames, d: Dims) -> list[TensorMap]:
    """All full Megatron tensors of the model, in checkpoint order (embedding, layers, head)."""
    H, F = d.hidden, d.ffn
    maps = [TensorMap("embedding.word_embeddings.weight", (n.embed,), "vocab", (d.padded_vocab, H), "vocab")]
    for i in range(d.layers):
        p, hp = f"decoder.layers.{i}.", n.layer.format(i=i)
        qkv = tuple(hp + x for x in (n.q, n.k, n.v))
        layer = [
            TensorMap(p + "input_layernorm.weight", (hp + n.input_norm,), "copy", (H,), "replicated"),
            TensorMap(
                p + "self_attention.linear_qkv.weight",
                tuple(x + ".weight" for x in qkv),
                "qkv",
                (d.qkv_rows, H),
                "column",
            ),
        ]
        if d.qkv_bias:
            layer.append(
                TensorMap(
                    p + "self_attention.linear_qkv.bias",
                    tuple(x + ".bias" for x in qkv),
                    "qkv",
                    (d.qkv_rows,),
                    "column",
                )
            )
        if d.qk_layernorm:
            if n.q_norm is None or n.k_norm is None:
                raise ConvertError("model.qk_layernorm=true, but this architecture has no q/k norm in HF")
            layer += [
                TensorMap(
                    p + f"self_attention.{m}_layernorm.weight", (hp + h,), "copy", (d.head_dim,), "replicated"
                )
                for m, h in (("q", n.q_norm), ("k", n.k_norm))
            ]
        o_in = d.heads * d.head_dim
        layer.append(
            TensorMap(
                p + "self_attention.linear_proj.weight", (hp + n.o + ".weight",), "copy", (H, o_in), "row"
            )
        )
        if d.linear_bias:
            layer.append(
                TensorMap(
                    p + "self_attention.linear_proj.bias", (hp + n.o + ".bias",), "copy", (H,), "replicated"
                )
            )
        layer.append(
            TensorMap(
                p + "pre_mlp_layernorm.weight", (hp + n.post_attention_norm,), "copy", (H,), "replicated"
            )
        )
        layer += _moe_maps(n, d, p, hp) if d.experts else _mlp_maps(d, p + "mlp.", hp, n.gate_up, n.down, F)
        maps.extend(TensorMap(m.mcore, m.hf, m.kind, m.shape, m.tp, layer=i) for m in layer)
    maps.append(TensorMap("decoder.final_layernorm.weight", (n.final_norm,), "copy", (H,), "replicated"))
    if not d.tied:
        maps.append(TensorMap("output_layer.weight", (n.lm_head,), "vocab", (d.padded_vocab, H), "vocab"))
    return maps


def _moe_maps(n: HFNames, d: Dims, p: str, hp: str) -> list[TensorMap]:
    """Router and every expert's gated MLP of one MoE layer (prefixes ``p`` Megatron, ``hp`` HF)."""
    if n.router is None:
        raise ConvertError("model.num_experts is set, but this architecture has no MoE layout in HF")
    out = [TensorMap(p + "mlp.router.weight", (hp + n.router,), "copy", (d.experts, d.hidden), "replicated")]
    for e in range(d.experts):
        out += _mlp_maps(
            d,
            p + f"mlp.experts.local_experts.{e}.",
            hp + n.expert.format(e=e),
            n.expert_gate_up,
            n.expert_down,
            d.expert_ffn,
        )
    return out


def _mlp_maps(d: Dims, p: str, mp: str, gate_up: tuple[str, ...], down: str, F: int) -> list[TensorMap]:
    """A gated MLP of inner width ``F``: Megatron names under ``p`` (``decoder.layers.3.mlp.``), HF
    names of its projections ``gate_up`` / ``down`` under ``mp`` (``model.layers.3.``, or an expert's
    prefix)."""
    H = d.hidden
    layer: list[TensorMap] = []
    fc1_kind: Kind = "gated" if len(gate_up) == 2 else "copy"
    layer.append(
        TensorMap(
            p + "linear_fc1.weight",
            tuple(mp + x + ".weight" for x in gate_up),
            fc1_kind,
            (2 * F, H),
            "gated_column",
        )
    )
    if d.linear_bias:
        layer.append(
            TensorMap(
                p + "linear_fc1.bias",
                tuple(mp + x + ".bias" for x in gate_up),
                fc1_kind,
                (2 * F,),
                "gated_column",
            )
        )
    layer.append(TensorMap(p + "linear_fc2.weight", (mp + down + ".weight",), "copy", (H, F), "row"))
    if d.linear_bias:
        layer.append(TensorMap(p + "linear_fc2.bias", (mp + down + ".bias",), "copy", (H,), "replicated"))
    return layer


def expected_hf_shapes(tm: TensorMap, d: Dims) -> list[tuple[int, ...]]:
    """Shapes of ``tm.hf`` implied by the config (no data touched: runs :func:`to_hf` on meta)."""
    meta = torch.empty(tm.shape, device="meta")
    return [tuple(t.shape) for _, t in to_hf(tm, meta, d)]


def _merge(tm: TensorMap, parts: Sequence[torch.Tensor], d: Dims) -> torch.Tensor:
    """The layout step of :func:`from_hf` (no checks): works on ``[rows, ...]`` and ``[rows]``."""
    if tm.kind == "copy":
        return parts[0]
    if tm.kind == "vocab":
        return pad_vocab(parts[0], tm.shape[0])
    if tm.kind == "gated":
        return torch.cat(list(parts), dim=0)
    if tm.kind == "qkv":
        return merge_qkv(*parts, heads=d.heads, groups=d.groups, head_dim=d.head_dim)
    raise ConvertError(f"{tm.mcore}: unknown map kind {tm.kind!r}")


def _split(tm: TensorMap, tensor: torch.Tensor, d: Dims) -> list[torch.Tensor]:
    """The layout step of :func:`to_hf` (no checks), inverse of :func:`_merge`."""
    if tm.kind == "copy":
        return [tensor]
    if tm.kind == "vocab":
        return [tensor[: d.vocab]]
    if tm.kind == "gated":
        return list(tensor.chunk(2, dim=0))
    if tm.kind == "qkv":
        return list(split_qkv(tensor, heads=d.heads, groups=d.groups, head_dim=d.head_dim))
    raise ConvertError(f"{tm.mcore}: unknown map kind {tm.kind!r}")


def from_hf(tm: TensorMap, hf_tensors: Sequence[torch.Tensor], d: Dims) -> torch.Tensor:
    """HF tensors (in ``tm.hf`` order) -> the full Megatron tensor ``tm.mcore`` of shape ``tm.shape``.

    Shapes are checked first; a mismatch raises :class:`ConvertError` naming the HF tensor.
    """
    if len(hf_tensors) != len(tm.hf):
        raise ConvertError(f"{tm.mcore}: expected {len(tm.hf)} HF tensors {tm.hf}, got {len(hf_tensors)}")
    for name, t, shape in zip(tm.hf, hf_tensors, expected_hf_shapes(tm, d)):
        if tuple(t.shape) != shape:
            raise ConvertError(
                f"shape mismatch for HF tensor {name}: got {tuple(t.shape)}, the config implies {shape}"
            )
    return _merge(tm, hf_tensors, d)


def to_hf(tm: TensorMap, tensor: torch.Tensor, d: Dims) -> list[tuple[str, torch.Tensor]]:
    """The full Megatron tensor ``tm.mcore`` -> ``[(hf_name, tensor), ...]`` in ``tm.hf`` order.

    Vocabulary tensors may carry any padding (rows >= vocab); other shapes must equal ``tm.shape``.
    """
    shape = tuple(tensor.shape)
    if tm.kind == "vocab":
        if len(shape) != 2 or shape[1] != tm.shape[1] or shape[0] < d.vocab:
            raise ConvertError(
                f"shape mismatch for {tm.mcore}: got {shape}, expected [>= {d.vocab}, {tm.shape[1]}]"
            )
    elif shape != tm.shape:
        raise ConvertError(f"shape mismatch for {tm.mcore}: got {shape}, the config implies {tm.shape}")
    return list(zip(tm.hf, _split(tm, tensor, d)))


# --------------------------------------------------------------------------------------------------
# Row plans: every map only reorders whole rows, so a conversion is a list of row-range copies
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowSegment:
    """``rows`` consecutive output rows taken from rows ``[row, row + rows)`` of source ``part``
    (``part == -1``: zero rows, the vocabulary padding)."""

    part: int
    row: int
    rows: int


def _coalesce(part: torch.Tensor, row: torch.Tensor) -> list[RowSegment]:
    """Per-row (part, row) -> maximal runs of consecutive rows of one part (or of zero rows)."""
    n = part.numel()
    if n == 0:
        return []
    brk = torch.ones(n, dtype=torch.bool)
    brk[1:] = (part[1:] != part[:-1]) | ((part[1:] >= 0) & (row[1:] != row[:-1] + 1))
    starts = brk.nonzero().flatten().tolist()
    ends = starts[1:] + [n]
    ps, rs = part[starts].tolist(), row[starts].tolist()
    return [RowSegment(p, r if p >= 0 else 0, e - s) for s, e, p, r in zip(starts, ends, ps, rs)]


def from_hf_row_plan(tm: TensorMap, d: Dims, *, derive: bool = False) -> list[RowSegment]:
    """Where each row of the Megatron tensor comes from (``part``: index into ``tm.hf``).

    Derived by running the very layout code of :func:`from_hf` on row numbers instead of rows, so
    the byte-copy fast path cannot disagree with the tensor path. ``copy`` / ``vocab`` / ``gated``
    have closed forms (a vocabulary of 150k rows would otherwise cost a per-row pass); tests check
    them against the derivation (``derive=True``).
    """
    sizes = [s[0] for s in expected_hf_shapes(tm, d)]
    if not derive and tm.kind in ("copy", "vocab", "gated"):
        segs = [RowSegment(j, 0, n) for j, n in enumerate(sizes) if n]
        pad = tm.shape[0] - sum(sizes)
        return segs + ([RowSegment(-1, 0, pad)] if pad > 0 else [])
    starts = [1 + sum(sizes[:j]) for j in range(len(sizes))]  # 0 is kept for "zero row"
    ids = _merge(tm, [torch.arange(n, dtype=torch.int64) + s for n, s in zip(sizes, starts)], d)
    bounds = torch.tensor(starts[1:], dtype=torch.int64)
    part = torch.where(ids > 0, torch.bucketize(ids, bounds, right=True), torch.full_like(ids, -1))
    row = ids - torch.tensor(starts, dtype=torch.int64)[part.clamp(min=0)]
    return _coalesce(part, row)


def to_hf_row_plan(
    tm: TensorMap, d: Dims, rows: int, *, derive: bool = False
) -> list[tuple[str, list[RowSegment]]]:
    """For each HF tensor of ``tm``, the rows of the (``rows``-row) Megatron tensor it consists of
    (closed forms and derivation as in :func:`from_hf_row_plan`)."""
    if not derive and tm.kind in ("copy", "vocab", "gated"):
        n = {"copy": rows, "vocab": d.vocab, "gated": rows // 2}[tm.kind]
        return [(name, [RowSegment(0, j * n, n)] if n else []) for j, name in enumerate(tm.hf)]
    ids = torch.arange(rows, dtype=torch.int64)
    return [(n, _coalesce(torch.zeros_like(x), x)) for n, x in zip(tm.hf, _split(tm, ids, d))]


# --------------------------------------------------------------------------------------------------
# Streams (weight sync and in-memory conversion)
# --------------------------------------------------------------------------------------------------


def iter_hf_tensors_from_megatron(
    named_full_tensors: Iterable[tuple[str, torch.Tensor]], mc: Any, *, spec: ArchSpec | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full (TP-merged, global layer index) Megatron tensors -> HF-named tensors, one at a time.

    The vocabulary padding is dropped; with tied embeddings an ``output_layer.weight`` (the last
    PP stage's copy) is skipped, as HF omits ``lm_head.weight``. Names outside the model raise.
    """
    from megatron_t1.convert.registry import spec_for_arch  # registry imports the arch modules

    spec = spec or spec_for_arch(getattr(mc, "model", mc).arch)
    d = Dims.of(mc)
    maps = {tm.mcore: tm for tm in decoder_maps(spec.names, d)}
    for name, t in named_full_tensors:
        tm = maps.get(name)
        if tm is None:
            if d.tied and name == "output_layer.weight":
                continue
            raise ConvertError(f"Megatron tensor {name} has no HF counterpart in {spec.hf_architecture}")
        yield from to_hf(tm, t, d)


def iter_megatron_tensors_from_hf(
    named_hf_tensors: Iterable[tuple[str, torch.Tensor]],
    mc: Any,
    *,
    tp: int = 1,
    spec: ArchSpec | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors in any order -> full Megatron tensors as soon as their parts are complete.

    Holds at most the incomplete groups (q/k/v or gate/up of a layer). Raises on unknown HF names
    (except ignorable buffers, and ``lm_head.weight`` with tied embeddings) and, at the end, on
    missing ones.
    """
    from megatron_t1.convert.registry import spec_for_arch

    spec = spec or spec_for_arch(getattr(mc, "model", mc).arch)
    d = Dims.of(mc, tp=tp)
    maps = decoder_maps(spec.names, d)
    owner = {h: tm for tm in maps for h in tm.hf}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    done: set[str] = set()
    for name, t in named_hf_tensors:
        tm = owner.get(name)
        if tm is None:
            if spec.is_ignored(name) or (d.tied and name == spec.names.lm_head):
                continue
            raise ConvertError(f"HF tensor {name} is not part of {spec.hf_architecture} with this config")
        if tm.mcore in done or name in pending.get(tm.mcore, {}):
            raise ConvertError(f"HF tensor {name} given twice")
        parts = pending.setdefault(tm.mcore, {})
        parts[name] = t
        if len(parts) == len(tm.hf):
            del pending[tm.mcore]
            done.add(tm.mcore)
            yield tm.mcore, from_hf(tm, [parts[h] for h in tm.hf], d)
    missing = [h for m in maps if m.mcore not in done for h in m.hf if h not in pending.get(m.mcore, {})]
    if missing:
        raise ConvertError(f"missing HF tensors ({len(missing)}): {missing[:8]}")
