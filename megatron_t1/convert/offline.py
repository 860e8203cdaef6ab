"""Offline conversion HF folder <-> Megatron torch_dist checkpoint, streaming and atomic.

Both directions walk the model one *full Megatron tensor* at a time (the maps of
:mod:`megatron_t1.convert.maps`). Every map only reorders whole rows (QKV grouping, gate/up,
vocabulary padding), so a tensor is a list of row ranges of its sources (the *row plan*):

* same dtype on both sides (the usual case): the bytes go file to file with ``copy_file_range``,
  as ``cp`` does, never entering this process (memory: a few MB whatever the model size);
* a dtype change (``--dtype``), or checkpoint chunks that are not plain rows (Megatron's
  row-parallel layers saved at TP > 1): tensors pass through memory, one full tensor (plus a 64 MB
  buffer, or one chunk) at a time.

MoE models (Qwen3-MoE) go the same way: each expert's ``linear_fc1`` / ``linear_fc2`` is one more
full tensor, written as its (layer, expert) chunk of the stacked ``mlp.experts.experts.*`` keys
(:mod:`megatron_t1.convert.torch_dist`), so memory stays one expert tensor whatever the model size.

Output goes to a temporary sibling folder renamed at the very end (:func:`atomic_output_dir`).
``hf_to_mcore`` also stores the HF config and tokenizer files under ``<ckpt>/hf/`` so that
``mcore_to_hf`` can rebuild a complete HF folder without a template.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from megatron_t1.convert.hf_io import (
    Progress,
    SafetensorsReader,
    SafetensorsShardWriter,
    atomic_output_dir,
    copy_hf_assets,
    dtype_name,
    parse_dtype,
    tensor_bytes,
)
from megatron_t1.convert.maps import (
    ArchSpec,
    ConvertError,
    Dims,
    RowSegment,
    TensorMap,
    expected_hf_shapes,
    from_hf_row_plan,
    to_hf,
    to_hf_row_plan,
)
from megatron_t1.convert.registry import (
    model_config_from_hf_dir,
    read_hf_config,
    spec_for_arch,
    spec_for_hf_architectures,
)
from megatron_t1.convert.sharding import check_layout
from megatron_t1.convert.torch_dist import (
    MODEL_PREFIX,
    UNFUSED_NORM_KEYS,
    TorchDistReader,
    TorchDistWriter,
    extra_state_objects,
    read_checkpoint_metadata,
    resolve_checkpoint_dir,
    sharded_key,
    write_checkpoint_metadata,
)

HF_ASSETS_DIR = "hf"
"""Sub-folder of a converted checkpoint holding the source's config.json and tokenizer files."""
_SHAPE_FIELDS = (
    ("num_hidden_layers", "num_layers"),
    ("hidden_size", "hidden_size"),
    ("intermediate_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("vocab_size", "vocab_size"),
)
_MOE_SHAPE_FIELDS = (
    ("num_experts", "num_experts"),
    ("num_experts_per_tok", "moe_router_topk"),
    ("moe_intermediate_size", "expert_ffn"),
)


def check_hf_tensors(reader: SafetensorsReader, spec: ArchSpec, maps: list[TensorMap], d: Dims) -> None:
    """Every mapped HF tensor present with the shape the config implies, nothing unexpected.

    Runs before anything is written, so a bad input fails in seconds with the tensor's name.
    """
    wanted = set()
    for tm in maps:
        for name, shape in zip(tm.hf, expected_hf_shapes(tm, d)):
            wanted.add(name)
            if name not in reader:
                hint = " (config.json says tie_word_embeddings=false)" if name == spec.names.lm_head else ""
                raise ConvertError(f"HF tensor {name} is missing from {reader.dir}{hint}")
            got = reader.entry(name).shape
            if tuple(got) != shape:
                raise ConvertError(
                    f"shape mismatch for HF tensor {name} in {reader.entry(name).file.name}: "
                    f"got {tuple(got)}, config.json implies {shape}"
                )
    extra = [
        n
        for n in reader.names()
        if n not in wanted and not spec.is_ignored(n) and not (d.tied and n == spec.names.lm_head)
    ]
    if extra:
        raise ConvertError(
            f"{len(extra)} HF tensors in {reader.dir} have no Megatron counterpart for "
            f"{spec.hf_architecture} with this config.json, e.g. {extra[:4]}"
        )


def _hf_ranges(reader: SafetensorsReader, tm: TensorMap, d: Dims) -> list[tuple[Path | None, int, int]]:
    """The bytes of the full Megatron tensor of ``tm`` as ``(file, offset, length)`` ranges of the
    HF files (``None``: zeros), from the row plan of the very layout code :func:`from_hf` runs."""
    entries = [reader.entry(h) for h in tm.hf]
    row_bytes = tensor_bytes(tm.shape[1:], entries[0].dtype)
    out: list[tuple[Path | None, int, int]] = []
    for seg in from_hf_row_plan(tm, d):
        n = seg.rows * row_bytes
        if seg.part < 0:
            out.append((None, 0, n))  # vocabulary padding
        else:
            e = entries[seg.part]
            out.append((e.file, e.begin + seg.row * row_bytes, n))
    return out


def _assemble_converted(
    reader: SafetensorsReader,
    tm: TensorMap,
    d: Dims,
    out_dtype: torch.dtype | None,
    *,
    chunk_bytes: int = 64 * 2**20,
) -> torch.Tensor:
    """The full Megatron tensor of ``tm`` in ``out_dtype``, built row range by row range (the row
    plan) through a ``chunk_bytes`` buffer: memory is the output plus one chunk, not the inputs,
    the merged tensor and its converted copy."""
    entries = [reader.entry(h) for h in tm.hf]
    dtype = out_dtype or entries[0].dtype
    out = torch.empty(tm.shape, dtype=dtype)
    rows = out.view(tm.shape[0], -1)
    row_len = rows.shape[1]
    pos = 0
    for seg in from_hf_row_plan(tm, d):
        if seg.part < 0:
            rows[pos : pos + seg.rows].zero_()
        else:
            e = entries[seg.part]
            row_bytes = row_len * e.dtype.itemsize
            step = max(1, chunk_bytes // max(row_bytes, 1))
            for i in range(0, seg.rows, step):
                k = min(step, seg.rows - i)
                tmp = torch.empty((k, row_len), dtype=e.dtype)
                reader.read_into(
                    tm.hf[seg.part], (seg.row + i) * row_bytes, tmp.view(-1).view(torch.uint8).numpy()
                )
                rows[pos + i : pos + i + k].copy_(tmp)
        pos += seg.rows
    return out


def _stacked(index: tuple[int, ...], d: Dims) -> tuple[int, ...]:
    """Sizes of the stacked axes of a slot: ``()``, ``(layers,)`` or ``(layers, experts)``."""
    return (d.layers, d.experts or 0)[: len(index)]


def hf_to_mcore(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tp: int | None = None,
    pp: int | None = None,
    ep: int | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    file_bytes: int = 4 * 2**30,
    prefix: str = MODEL_PREFIX,
) -> Path:
    """Convert an HF folder into a torch_dist checkpoint that loads at any TP/PP (and EP).

    ``tp`` / ``pp`` / ``ep`` (default 1): the layout checked (heads, groups, FFN, expert width and
    layers divisible; experts divisible by ``ep``) and the vocabulary padding stored; experts are
    stored by global index, so nothing else depends on the layout. ``dtype``: ``bf16`` / ``fp32``
    (default: as stored in HF).
    """
    tp, pp, ep = tp or 1, pp or 1, ep or 1
    out_dtype = parse_dtype(dtype) if isinstance(dtype, str) or dtype is None else dtype
    spec, mc, raw = model_config_from_hf_dir(hf_dir)
    check_layout(mc, tp=tp, pp=pp, ep=ep)
    maps = spec.tensor_maps(mc, tp=tp)
    d = Dims.of(mc, tp=tp)
    reader = SafetensorsReader(hf_dir)
    check_hf_tensors(reader, spec, maps, d)

    def nbytes(tm: TensorMap) -> int:
        dt = out_dtype or reader.entry(tm.hf[0]).dtype
        return tensor_bytes(tm.shape, dt)

    bar = Progress(sum(nbytes(tm) for tm in maps), len(maps), "hf -> mcore", enabled=progress)
    try:
        with atomic_output_dir(out_dir) as tmp:
            writer = TorchDistWriter(tmp, file_bytes=file_bytes)
            try:
                for tm in maps:
                    key, index = sharded_key(tm.mcore, prefix)
                    lead = _stacked(index, d)
                    # MoE layers: the pre-MLP norm under TE's unfused key as well (UNFUSED_NORM_KEYS)
                    alias = UNFUSED_NORM_KEYS.get(key.removeprefix(prefix)) if d.experts else None
                    keys = [key] + ([prefix + alias] if alias else [])
                    dtypes = {reader.entry(h).dtype for h in tm.hf}
                    if len(dtypes) == 1 and out_dtype in (None, *dtypes):
                        # Same dtype: the bytes go file to file, row ranges in Megatron's order.
                        ranges = _hf_ranges(reader, tm, d)
                        dt = dtypes.pop()
                        for k in keys:
                            writer.add_tensor_from_ranges(k, tm.shape, dt, ranges, index=index, lead=lead)
                        bar.update(sum(r[2] for r in ranges))
                        continue
                    full = _assemble_converted(reader, tm, d, out_dtype)
                    for k in keys:
                        writer.add_tensor(k, full, index=index, lead=lead)
                    bar.update(full.numel() * full.element_size())
                    del full
                for key, index, lead in extra_state_objects(
                    d.layers, experts=d.experts, qk_layernorm=d.qk_layernorm
                ):
                    writer.add_object(prefix + key, None, index=index, lead=lead)
                writer.finish()
            finally:
                writer.close()
                reader.close()
            (tmp / HF_ASSETS_DIR).mkdir()
            copy_hf_assets(hf_dir, tmp / HF_ASSETS_DIR)
            # Our metadata last: a folder without it is never taken for a complete checkpoint.
            write_checkpoint_metadata(
                tmp,
                mc,
                tp=tp,
                pp=pp,
                ep=ep,
                step=0,
                hf_architecture=spec.hf_architecture,
                hf_config=raw,
                dtype=dtype_name(out_dtype or reader.entry(maps[0].hf[0]).dtype),
                source={"tool": "convert_ckpt hf-to-mcore", "hf_dir": str(Path(hf_dir).resolve())},
                key_prefix=prefix,
            )
    finally:
        bar.close()
    return Path(out_dir)


def _model_config(meta: dict) -> Any:
    from megatron_t1.config import ModelConfig

    return ModelConfig(**meta["model"])


def _export_config(
    mc: Any, spec: ArchSpec, meta: dict | None, ckpt: Path, template: Path | None, dtype: str
) -> dict:
    """config.json for the export: the template's, else the converted source's, else generated."""
    if template is not None:
        cfg = read_hf_config(template)
    elif (ckpt / HF_ASSETS_DIR / "config.json").is_file():
        cfg = read_hf_config(ckpt / HF_ASSETS_DIR)
    elif meta is not None and meta.get("hf_config"):
        cfg = dict(meta["hf_config"])
    else:
        if spec.hf_config is None:
            raise ConvertError(f"{spec.hf_architecture}: no config.json generator; pass --hf-template")
        cfg = spec.hf_config(mc, dtype)
    where = f"config.json of {template}" if template is not None else "the exported config.json"
    if spec.hf_architecture not in (cfg.get("architectures") or []):
        raise ConvertError(
            f"{where} is for {cfg.get('architectures')}, the checkpoint is {spec.hf_architecture}"
        )
    for hf_key, ours in _SHAPE_FIELDS + (_MOE_SHAPE_FIELDS if mc.num_experts else ()):
        theirs = cfg.get(hf_key)
        if theirs is None and hf_key == "num_experts":  # transformers 5's name
            theirs = cfg.get("num_local_experts")
        if theirs != getattr(mc, ours):
            raise ConvertError(
                f"{where}: {hf_key}={theirs} but the checkpoint has {ours}={getattr(mc, ours)}"
            )
    if cfg.get("num_key_value_heads", cfg["num_attention_heads"]) != (
        mc.num_query_groups or mc.num_attention_heads
    ):
        raise ConvertError(f"{where}: num_key_value_heads disagrees with the checkpoint's num_query_groups")
    cfg["tie_word_embeddings"] = mc.tie_word_embeddings
    if "dtype" in cfg:  # transformers 5 name
        cfg["dtype"] = dtype
    else:
        cfg["torch_dtype"] = dtype
    return cfg


def _byte_ranges(
    raw: list[tuple[int, int, Path, int]], segs: list[RowSegment], row_bytes: int
) -> list[tuple[Path, int, int]]:
    """Row segments of a Megatron tensor -> (file, offset, length) ranges of its raw chunks."""
    out = []
    for seg in segs:
        r, end = seg.row, seg.row + seg.rows
        for r0, r1, path, base in raw:
            if r >= end:
                break
            lo, hi = max(r, r0), min(end, r1)
            if lo < hi:
                out.append((path, base + (lo - r0) * row_bytes, (hi - lo) * row_bytes))
                r = hi
    return out


def mcore_to_hf(
    mcore_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    hf_template: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    progress: bool = True,
) -> Path:
    """Export a torch_dist checkpoint (ours, or a run's ``checkpoints/`` folder) as an HF folder.

    Writes ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, ``config.json``
    and the tokenizer / generation-config files of ``hf_template`` (or those stored at conversion).
    ``dtype``: output dtype (default: as stored).
    """
    ckpt = resolve_checkpoint_dir(mcore_dir)
    template = Path(hf_template) if hf_template is not None else None
    out_dtype = parse_dtype(dtype) if isinstance(dtype, str) or dtype is None else dtype
    try:
        meta = read_checkpoint_metadata(ckpt)
    except ConvertError:
        if template is None or not (ckpt / ".metadata").is_file():
            raise
        meta = None  # a foreign torch_dist checkpoint: the template describes the model
    if meta is not None:
        mc = _model_config(meta)
        spec = (
            spec_for_hf_architectures(meta["hf_architecture"])
            if meta.get("hf_architecture")
            else spec_for_arch(mc.arch)
        )
    else:
        spec, mc, _ = model_config_from_hf_dir(template)
    reader = TorchDistReader(ckpt)
    maps = spec.tensor_maps(mc, tp=1)
    d = Dims.of(mc)

    # Plan every output tensor (names, shapes, dtypes) from the metadata alone: shape errors surface
    # before any byte is written, and each shard's header can be written ahead of its data.
    plan: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    for tm in maps:
        shape, stored = reader.shape_mcore(tm.mcore)
        for name, t in to_hf(tm, torch.empty(shape, device="meta"), d):
            plan.append((name, tuple(t.shape), out_dtype or stored))
    torch_dtype = dtype_name(plan[0][2])
    bar = Progress(sum(tensor_bytes(s, dt) for _, s, dt in plan), len(plan), "mcore -> hf", enabled=progress)
    try:
        with atomic_output_dir(out_dir) as tmp:
            writer = SafetensorsShardWriter(tmp, plan, max_shard_bytes=max_shard_bytes)
            try:
                for tm in maps:
                    key, index = reader.locate(tm.mcore)
                    md = reader.tensor_meta(key)
                    raw = reader.raw_row_ranges(key, index)
                    if raw is not None and out_dtype in (None, md.properties.dtype):
                        # Bytes go file to file: each HF tensor is row ranges of the Megatron one.
                        shape, dt = reader.shape_mcore(tm.mcore)
                        row_bytes = tensor_bytes(shape[1:], dt)
                        for name, segs in to_hf_row_plan(tm, d, shape[0]):
                            ranges = _byte_ranges(raw, segs, row_bytes)
                            writer.write_ranges(name, ranges)
                            bar.update(sum(r[2] for r in ranges))
                        continue
                    full = reader.read_mcore(tm.mcore)
                    for name, t in to_hf(tm, full, d):
                        t = t.to(out_dtype) if out_dtype is not None else t
                        writer.write(name, t)
                        bar.update(t.numel() * t.element_size())
                    del full
                writer.finish()
            finally:
                writer.close()
            cfg = _export_config(mc, spec, meta, ckpt, template, torch_dtype)
            assets = template if template is not None else ckpt / HF_ASSETS_DIR
            if assets.is_dir():
                copy_hf_assets(assets, tmp, skip=("config.json",))
            if not (tmp / "generation_config.json").is_file():
                gen = {
                    k: cfg[k]
                    for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                    if cfg.get(k) is not None
                }
                (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    finally:
        bar.close()
    return Path(out_dir)
