"""Megatron-Core ``torch_dist`` checkpoints written and read tensor by tensor (no megatron import).

A torch_dist checkpoint is a ``torch.distributed.checkpoint`` (DCP) folder plus two small Megatron
files::

    .metadata          pickled DCP ``Metadata``: for every key its global shape, dtype and chunks
                       (offsets + sizes), and where each chunk's bytes are (file, offset, length)
    __0_K.distcp       data files: each chunk is a ``torch.save`` record at its offset
    common.pt          Megatron's non-sharded state (``{}`` for weights only)
    metadata.json      {"sharded_backend": "torch_dist", ...}
    megatron_t1.json   ours: format, ModelConfig fields, tp, pp, step, HF architecture and config

``megatron.core.dist_checkpointing.save`` needs the whole sharded state dict at once (a 32B model is
64 GB in bf16). :class:`TorchDistWriter` instead appends one chunk at a time to the data files and
writes ``.metadata`` at the end, the same bytes ``FileSystemWriter`` would produce; memory is the
tensor in hand. :class:`TorchDistReader` reads any slot of a key (a layer, or an expert of a layer)
from whatever chunks cover it, so it also reads checkpoints that Megatron wrote at any TP/PP.

Keys follow ``GPTModel.sharded_state_dict(prefix="model.")``: decoder layers are *stacked* under a
key without the layer number, with the global layer index as a leading axis
(``model.decoder.layers.self_attention.linear_qkv.weight``: ``[L, (nq+2ng)*d, H]``, one chunk per
layer); the layer norms live under TE-style names (``input_layernorm`` ->
``self_attention.linear_qkv.layer_norm_weight``, ``pre_mlp_layernorm`` ->
``mlp.linear_fc1.layer_norm_weight``); each linear layer of the local spec also has an
``_extra_state`` object (``None``) per layer. The saved global tensors do not depend on TP (QKV is
grouped, fc1 is ``[gate; up]``), except the vocabulary padding; Megatron loads the embedding and
output layer with ``allow_shape_mismatch``, so a checkpoint padded for one TP loads at another.

MoE layers (``SequentialMLP``, and ``TEGroupedMLP`` / ``GroupedMLP``, which save the same keys)
stack the experts too, under ``mlp.experts.experts.*`` with the *global* expert index as a second
leading axis: ``model.decoder.layers.mlp.experts.experts.linear_fc1.weight`` is
``[L, E, 2F, H]`` (``[gate; up]`` per expert) and ``...linear_fc2.weight`` ``[L, E, H, F]``, one
chunk per (layer, expert) here (Megatron writes one per EP rank's expert and TP shard, gate and up
apart); their ``_extra_state`` objects are ``[L, E]`` grids. The router is ``mlp.router.weight``
``[L, E, H]``. Nothing depends on EP, so a checkpoint loads at any EP. A tensor's place is
:func:`sharded_key`'s ``(key, index)``: ``index`` is ``()``, ``(layer,)`` or ``(layer, expert)``.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from megatron_t1.atomic import write_text_atomic
from megatron_t1.convert.hf_io import copy_range, write_all
from megatron_t1.convert.maps import ConvertError
from megatron_t1.convert.sharding import layer_index
from megatron_t1.convert.torch_records import FileView, RecordSplitter, no_crc32, raw_data_offset, write_zeros

MODEL_PREFIX = "model."
"""Prefix of the model's keys (``mcore/checkpoint.py`` loads ``sharded_state_dict(prefix=...)``)."""
METADATA_FILE = "megatron_t1.json"
FORMAT = "megatron_t1/torch_dist"
EXTRA_STATE_MODULES = (
    "self_attention.linear_proj",
    "self_attention.linear_qkv",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
"""Local-spec modules that save an ``_extra_state`` ShardedObject per layer (dense layers)."""
EXPERT_EXTRA_STATE_MODULES = ("mlp.experts.experts.linear_fc1", "mlp.experts.experts.linear_fc2")
"""MoE layers: the expert linears' ``_extra_state`` objects, one per (layer, expert), in place of
the dense ``mlp.linear_fc1`` / ``mlp.linear_fc2`` ones."""
_TE_NORM_KEYS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_MCORE_NORM_NAMES = {v: k for k, v in _TE_NORM_KEYS.items()}
UNFUSED_NORM_KEYS = {
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": "decoder.layers.pre_mlp_layernorm.weight",
}
"""Fused-norm key -> the key of the same norm as its own module. TE's layer spec of an MoE layer
has no ``linear_fc1`` to fuse the pre-MLP norm into: it saves a ``TENorm`` under
``pre_mlp_layernorm.weight`` (with an ``_extra_state``), where the local spec maps it to
``mlp.linear_fc1.layer_norm_weight``. MoE checkpoints carry both (loading ignores unused keys);
the reader takes either."""
_EXPERT_REST = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$")
_STACKED_EXPERTS = "mlp.experts.experts."
_MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


def sharded_key(mcore_name: str, prefix: str = MODEL_PREFIX) -> tuple[str, tuple[int, ...]]:
    """Full Megatron name (global layer and expert indices) -> (checkpoint key, index along the
    key's stacked axes: ``()``, ``(layer,)`` or ``(layer, expert)``)."""
    i = layer_index(mcore_name)
    if i is None:
        return prefix + mcore_name, ()
    rest = mcore_name.split(f"decoder.layers.{i}.", 1)[1]
    m = _EXPERT_REST.match(rest)
    if m:
        return f"{prefix}decoder.layers.{_STACKED_EXPERTS}{m.group(2)}", (i, int(m.group(1)))
    return f"{prefix}decoder.layers.{_TE_NORM_KEYS.get(rest, rest)}", (i,)


def mcore_name(key: str, index: tuple[int, ...], prefix: str = MODEL_PREFIX) -> str:
    """Inverse of :func:`sharded_key`."""
    name = key.removeprefix(prefix)
    if not index:
        return name
    rest = name.removeprefix("decoder.layers.")
    if len(index) == 2:
        rest = rest.removeprefix(_STACKED_EXPERTS)
        return f"decoder.layers.{index[0]}.mlp.experts.local_experts.{index[1]}.{rest}"
    return f"decoder.layers.{index[0]}.{_MCORE_NORM_NAMES.get(rest, rest)}"


def extra_state_objects(
    num_layers: int, *, experts: int | None = None, qk_layernorm: bool = False
) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """``(key without prefix, index, lead)`` of every ``_extra_state`` object a model saves (the
    checkpoint must have them: loading fails on a missing key, and ignores unused ones).

    The local spec's linears have one per layer, expert linears one per (layer, expert). TE's layer
    spec adds its norms that are modules of their own (``TENorm``, a TE op with an ``_extra_state``):
    the q/k norms with ``qk_layernorm`` and, in MoE layers, ``pre_mlp_layernorm``; they are written
    too so that a TE model loads the checkpoint (TE's ``set_extra_state(None)`` is a no-op).
    """
    lay, grid = (num_layers,), (num_layers, experts or 0)
    per_layer = [m for m in EXTRA_STATE_MODULES if not (experts and m.startswith("mlp."))]
    if qk_layernorm:
        per_layer += ["self_attention.q_layernorm", "self_attention.k_layernorm"]
    if experts:
        per_layer.append("pre_mlp_layernorm")
    out = [(f"decoder.layers.{m}._extra_state", (i,), lay) for i in range(num_layers) for m in per_layer]
    for i in range(num_layers if experts else 0):
        for e in range(experts or 0):
            out += [(f"decoder.layers.{m}._extra_state", (i, e), grid) for m in EXPERT_EXTRA_STATE_MODULES]
    return out


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


class TorchDistWriter:
    """Append tensors and objects to a torch_dist checkpoint folder one at a time.

    A tensor or object is either the whole of its key, or the slot ``index`` of a key *stacked*
    along leading axes of sizes ``lead`` (``index=(3,), lead=(L,)``: layer 3 of a per-layer key;
    ``index=(3, 5), lead=(L, E)``: expert 5 of layer 3). ``file_bytes``: start a new
    ``__0_K.distcp`` data file after this many bytes (keeps files a manageable size for copying; any
    value loads the same).
    """

    def __init__(self, ckpt_dir: str | os.PathLike, *, file_bytes: int = 4 * 2**30):
        # Private to DCP's filesystem backend, but it is what its reader expects in storage_data.
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        self._storage_info = _StorageInfo
        self.dir = Path(ckpt_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file_bytes = file_bytes
        self.state_dict_metadata: dict[str, Any] = {}
        self.storage_data: dict[MetadataIndex, Any] = {}
        self._written: set[tuple[str, tuple[int, ...]]] = set()
        self._file_no = -1
        self._fh: io.BufferedWriter | None = None
        self._finished = False

    def _stream(self) -> tuple[io.BufferedWriter, str]:
        if self._fh is None or self._fh.tell() >= self.file_bytes:
            if self._fh is not None:
                self._fh.close()
            self._file_no += 1
            self._fh = open(self.dir / f"__0_{self._file_no}.distcp", "wb")
        return self._fh, f"__0_{self._file_no}.distcp"

    def _append(self, index: MetadataIndex, payload: torch.Tensor | bytes) -> None:
        fh, rel = self._stream()
        start = fh.tell()
        if isinstance(payload, torch.Tensor):
            with no_crc32():
                torch.save(payload, fh)
        else:
            fh.write(payload)
        self.storage_data[index] = self._storage_info(rel, start, fh.tell() - start)

    def _register(
        self,
        key: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        index: tuple[int, ...],
        lead: tuple[int, ...],
    ) -> tuple[tuple[int, ...], MetadataIndex]:
        """Record a chunk in the metadata; returns (chunk shape, storage index)."""
        if len(index) != len(lead) or not all(0 <= i < n for i, n in zip(index, lead)):
            raise ConvertError(f"{key}: index {index} outside the stacked axes {lead}")
        global_shape = (*lead, *shape)
        offsets = (*index, *(0,) * len(shape))
        chunk_shape = (*(1,) * len(index), *shape)
        md = self.state_dict_metadata.get(key)
        if md is None:
            md = TensorStorageMetadata(
                properties=TensorProperties(dtype=dtype), size=torch.Size(global_shape), chunks=[]
            )
            self.state_dict_metadata[key] = md
        elif tuple(md.size) != global_shape or md.properties.dtype != dtype:
            raise ConvertError(
                f"{key}: slot {index} has shape/dtype {shape} {dtype}, "
                f"others {tuple(md.size)[len(lead) :]} {md.properties.dtype}"
            )
        if (key, offsets) in self._written:
            raise ConvertError(f"{key}: chunk at {offsets} written twice")
        self._written.add((key, offsets))
        md.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(chunk_shape)))
        return chunk_shape, MetadataIndex(key, torch.Size(offsets))

    def add_tensor(
        self, key: str, tensor: torch.Tensor, *, index: tuple[int, ...] = (), lead: tuple[int, ...] = ()
    ) -> None:
        """Write ``tensor`` as the whole of ``key``, or as slot ``index`` of a key stacked along
        leading axes ``lead`` (global shape ``[*lead, *tensor.shape]``)."""
        t = tensor.detach().to("cpu")
        # torch.save writes a view's whole storage: give it a tensor that owns exactly its bytes.
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.contiguous().clone()
        chunk_shape, md_index = self._register(key, tuple(t.shape), t.dtype, index, lead)
        self._append(md_index, t.reshape(chunk_shape))

    def add_tensor_from_ranges(
        self,
        key: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        ranges: Sequence[tuple[Path | None, int, int]],
        *,
        index: tuple[int, ...] = (),
        lead: tuple[int, ...] = (),
    ) -> None:
        """Like :meth:`add_tensor`, with the tensor's raw bytes given as ``(file, offset, length)``
        ranges of other files (``file=None``: zeros), copied in the kernel (``copy_file_range``).

        The record around the bytes is what ``torch.save`` writes for a tensor of this shape and
        dtype, obtained by saving an untouched ``torch.empty`` into
        :class:`~megatron_t1.convert.torch_records.RecordSplitter`.
        """
        nbytes = math.prod(shape) * dtype.itemsize
        if sum(r[2] for r in ranges) != nbytes:
            raise ConvertError(f"{key}: byte ranges add up to {sum(r[2] for r in ranges)}, expected {nbytes}")
        chunk_shape, md_index = self._register(key, tuple(shape), dtype, index, lead)
        splitter = RecordSplitter(nbytes)
        with no_crc32():
            torch.save(torch.empty(chunk_shape, dtype=dtype), splitter)
        head, tail = splitter.parts()
        fh, rel = self._stream()
        fh.flush()
        start = fh.tell()
        fd = fh.fileno()
        write_all(fd, head)
        for path, off, n in ranges:
            if path is None:
                write_zeros(fd, n)
            else:
                copy_range(path, off, n, fd, what=key)
        write_all(fd, tail)
        fh.seek(0, os.SEEK_END)  # the buffered writer's position follows the raw writes
        self.storage_data[md_index] = self._storage_info(rel, start, fh.tell() - start)

    def add_object(
        self, key: str, obj: Any, *, index: tuple[int, ...] = (), lead: tuple[int, ...] = ()
    ) -> None:
        """A Megatron ``ShardedObject`` (saved with ``torch.save``) under its unique key
        ``{key}/shard_{index}_{lead}`` (``shard_3.5_48.128``: layer 3, expert 5 of 48 x 128)."""
        offset, shape = (index, lead) if index else ((0,), (1,))
        unique = f"{key}/shard_{'.'.join(map(str, offset))}_{'.'.join(map(str, shape))}"
        buf = io.BytesIO()
        torch.save([obj], buf)  # Megatron saves the list of a key's local objects (one here)
        self.state_dict_metadata[unique] = BytesStorageMetadata()
        self._append(MetadataIndex(unique), buf.getvalue())

    def finish(self) -> None:
        """Close the data files and write ``.metadata``, ``common.pt`` and ``metadata.json``."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        incomplete = []
        for key, md in self.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                covered = sum(torch.Size(c.sizes).numel() for c in md.chunks)
                if covered != md.size.numel():
                    incomplete.append(f"{key} ({len(md.chunks)} chunks)")
        if incomplete:
            raise ConvertError(
                f"checkpoint incomplete, some layers / experts were not written: {incomplete[:4]}"
            )
        metadata = Metadata(state_dict_metadata=self.state_dict_metadata, storage_data=self.storage_data)
        if "version" in {f.name for f in dataclasses.fields(Metadata)}:
            metadata.version = "1.0.0"
        with open(self.dir / ".metadata", "wb") as f:
            pickle.dump(metadata, f)
        torch.save({}, self.dir / "common.pt")
        (self.dir / "metadata.json").write_text(json.dumps(_MEGATRON_METADATA))
        self._finished = True

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class TorchDistReader:
    """Read tensors, or one slot of a stacked tensor (a layer, or an expert of a layer), from a
    torch_dist checkpoint folder."""

    def __init__(self, ckpt_dir: str | os.PathLike):
        self.dir = Path(ckpt_dir)
        md_path = self.dir / ".metadata"
        if not md_path.is_file():
            raise ConvertError(f"{self.dir} is not a torch_dist checkpoint (no .metadata)")
        mj = self.dir / "metadata.json"
        if mj.is_file() and json.loads(mj.read_text()).get("sharded_backend") not in (None, "torch_dist"):
            raise ConvertError(f"{mj}: only the torch_dist backend is supported")
        with open(md_path, "rb") as f:
            self.metadata: Metadata = pickle.load(f)
        self.storage = {
            (i.fqn, tuple(i.offset) if i.offset is not None else None): s
            for i, s in self.metadata.storage_data.items()
        }
        self._slots: dict[tuple[str, int], dict[tuple[int, ...], list[ChunkStorageMetadata]]] = {}
        self.prefix = self._detect_prefix()

    def _detect_prefix(self) -> str:
        """The policy's key prefix: ``model.`` when present (a training checkpoint may also hold
        e.g. an anchor copy under another prefix), else the shortest (Megatron-LM uses none)."""
        found = [
            m.group(1)
            for key in self.metadata.state_dict_metadata
            if (m := re.fullmatch(r"(.*)embedding\.word_embeddings\.weight", key))
        ]
        if not found:
            raise ConvertError(f"{self.dir}: no embedding.word_embeddings.weight key; not a GPT checkpoint")
        return MODEL_PREFIX if MODEL_PREFIX in found else min(found, key=len)

    def keys(self) -> list[str]:
        return list(self.metadata.state_dict_metadata)

    def tensor_meta(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise ConvertError(f"{self.dir}: tensor {key} not in the checkpoint")
        return md

    def _load_chunk(self, key: str, chunk: ChunkStorageMetadata) -> torch.Tensor:
        info = self.storage.get((key, tuple(chunk.offsets)))
        if info is None:
            raise ConvertError(f"{self.dir}: no data for {key} at {tuple(chunk.offsets)}")
        if getattr(info, "transform_descriptors", None):
            raise ConvertError(
                f"{self.dir}: {key} uses DCP transforms {info.transform_descriptors} (unsupported)"
            )
        path = self.dir / info.relative_path
        if not path.is_file():
            raise ConvertError(f"missing checkpoint file {path} (holds {key})")
        with FileView(path, info.offset, info.length) as view:
            t = torch.load(view, map_location="cpu", weights_only=True)
        if t.numel() != torch.Size(chunk.sizes).numel():
            raise ConvertError(
                f"{path}: chunk of {key} has {t.numel()} elements, expected {tuple(chunk.sizes)}"
            )
        return t.reshape(tuple(chunk.sizes))

    def _chunks_at(self, key: str, index: tuple[int, ...]) -> list[ChunkStorageMetadata]:
        """The chunks of ``key`` that hold part of slot ``index`` (all chunks for ``()``); indexed
        once per key, as an MoE key has a chunk per (layer, expert, TP shard)."""
        md = self.tensor_meta(key)
        n = len(index)
        if not n:
            return list(md.chunks)
        slots = self._slots.get((key, n))
        if slots is None:
            slots = {}
            for c in md.chunks:
                spans = [range(o, o + z) for o, z in zip(tuple(c.offsets)[:n], tuple(c.sizes)[:n])]
                for slot in itertools.product(*spans):
                    slots.setdefault(slot, []).append(c)
            self._slots[(key, n)] = slots
        return slots.get(tuple(index), [])

    def _check_index(self, key: str, size: tuple[int, ...], index: tuple[int, ...]) -> None:
        if len(index) > len(size) or any(not 0 <= i < n for i, n in zip(index, size)):
            raise ConvertError(f"{key}: slot {index} outside the stacked axes {size[: len(index)]}")

    def read(self, key: str, index: tuple[int, ...] = ()) -> torch.Tensor:
        """The whole tensor ``key``, or slot ``key[index]`` of a stacked one (``(layer,)`` or
        ``(layer, expert)``), assembled from its chunks."""
        md = self.tensor_meta(key)
        size = tuple(md.size)
        n = len(index)
        self._check_index(key, size, index)
        lo = (*index, *(0,) * (len(size) - n))
        hi = (*(i + 1 for i in index), *size[n:])
        region = tuple(h - lo_ for lo_, h in zip(lo, hi))
        out = None
        filled = 0
        for c in self._chunks_at(key, index):
            c_lo = tuple(c.offsets)
            c_hi = tuple(o + s for o, s in zip(c.offsets, c.sizes))
            a = tuple(max(x, y) for x, y in zip(lo, c_lo))
            b = tuple(min(x, y) for x, y in zip(hi, c_hi))
            if any(x >= y for x, y in zip(a, b)):
                continue
            t = self._load_chunk(key, c)
            if c_lo == lo and c_hi == hi:  # the usual case: one chunk is exactly the region
                out, filled = t, t.numel()
                break
            if out is None:
                out = torch.empty(region, dtype=md.properties.dtype)
            src = t[tuple(slice(x - o, y - o) for x, y, o in zip(a, b, c_lo))]
            out[tuple(slice(x - o, y - o) for x, y, o in zip(a, b, lo))] = src
            filled += src.numel()
            del t
        if out is None or filled != torch.Size(region).numel():
            what = f"slot {index}" if index else "it"
            raise ConvertError(f"{self.dir}: the chunks of {key} do not cover {what}")
        return out.reshape(size[n:])

    def _raw_record(
        self, key: str, chunk: ChunkStorageMetadata, dtype: torch.dtype
    ) -> tuple[Path, int] | None:
        """(file, byte offset) of a chunk's raw data when its record holds exactly the chunk."""
        info = self.storage.get((key, tuple(chunk.offsets)))
        if info is None or getattr(info, "transform_descriptors", None):
            return None
        path = self.dir / info.relative_path
        start = raw_data_offset(path, info.offset, info.length, torch.Size(chunk.sizes).numel(), dtype)
        return None if start is None else (path, start)

    def raw_row_ranges(
        self, key: str, index: tuple[int, ...] = ()
    ) -> list[tuple[int, int, Path, int]] | None:
        """The rows of ``key`` (or of slot ``key[index]``) as ``(row0, row1, file, byte offset of
        row0)`` runs of raw bytes, when every chunk covering them is a full-width raw record; else None.

        A "row" is a slice along the first axis after the stacked ones; the ranges let an export copy
        bytes file to file (``copy_file_range``) without materialising the tensor.
        """
        md = self.tensor_meta(key)
        size = tuple(md.size)
        lead = len(index)
        if len(size) <= lead:
            return None
        self._check_index(key, size, index)
        rows, rest = size[lead], size[lead + 1 :]
        row_bytes = math.prod(rest) * md.properties.dtype.itemsize
        out = []
        for c in self._chunks_at(key, index):
            off, sz = tuple(c.offsets), tuple(c.sizes)
            if tuple(sz[lead + 1 :]) != rest or any(off[lead + 1 :]):
                return None  # split along a later axis (e.g. a row-parallel layer saved at TP > 1)
            raw = self._raw_record(key, c, md.properties.dtype)
            if raw is None:
                return None
            slot = 0  # position of the slot among the chunk's own stacked slots (row-major)
            for i, o, z in zip(index, off, sz):
                slot = slot * z + (i - o)
            r0 = off[lead]
            out.append((r0, r0 + sz[lead], raw[0], raw[1] + slot * sz[lead] * row_bytes))
        out.sort()
        if [r[0] for r in out] != [0] + [r[1] for r in out[:-1]] or (out and out[-1][1] != rows) or not out:
            return None
        return out

    def locate(self, mcore_full_name: str) -> tuple[str, tuple[int, ...]]:
        """(checkpoint key, slot) of a Megatron tensor by its TP=1 name with global layer (and
        expert) indices; a norm saved unfused (:data:`UNFUSED_NORM_KEYS`) is found under that key."""
        key, index = sharded_key(mcore_full_name, self.prefix)
        if key not in self.metadata.state_dict_metadata:
            other = UNFUSED_NORM_KEYS.get(key.removeprefix(self.prefix))
            if other is not None and self.prefix + other in self.metadata.state_dict_metadata:
                return self.prefix + other, index
        return key, index

    def read_mcore(self, mcore_full_name: str) -> torch.Tensor:
        """A full Megatron tensor by its TP=1 name with the global layer (and expert) index."""
        return self.read(*self.locate(mcore_full_name))

    def shape_mcore(self, mcore_full_name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(full shape, dtype) of a Megatron tensor without reading it."""
        key, index = self.locate(mcore_full_name)
        md = self.tensor_meta(key)
        shape = tuple(md.size)
        if len(shape) < len(index) or any(i >= n for i, n in zip(index, shape)):
            raise ConvertError(
                f"{self.dir}: {key} has stacked axes {shape[: len(index)]}, slot {index} requested"
            )
        return shape[len(index) :], md.properties.dtype


# --------------------------------------------------------------------------------------------------
# Our metadata file
# --------------------------------------------------------------------------------------------------


def write_checkpoint_metadata(
    ckpt_dir: str | os.PathLike, model: Any, *, tp: int, pp: int, step: int = 0, **extra: Any
) -> dict:
    """Write ``megatron_t1.json`` atomically: {"format", "step", "model", "tp", "pp", **extra}.

    ``model``: a ModelConfig (or its dict). The same layout ``mcore/checkpoint.py`` writes.
    """
    model_dict = dataclasses.asdict(model) if dataclasses.is_dataclass(model) else dict(model)
    meta = {"format": FORMAT, "step": step, "model": model_dict, "tp": tp, "pp": pp, **extra}
    write_text_atomic(Path(ckpt_dir) / METADATA_FILE, json.dumps(meta, indent=2))
    return meta


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run's ``checkpoints/`` folder whose ``latest`` names one."""
    p = Path(path)
    if (p / "latest").is_file() and not (p / ".metadata").is_file():
        return p / (p / "latest").read_text().strip()
    return p


def read_checkpoint_metadata(ckpt_dir: str | os.PathLike) -> dict:
    """Read and check ``megatron_t1.json`` (a folder without it is not a complete checkpoint)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise ConvertError(f"checkpoint folder not found: {d}")
    p = d / METADATA_FILE
    if not p.is_file():
        raise ConvertError(f"{d} is not a complete megatron_t1 checkpoint (no {METADATA_FILE})")
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT:
        raise ConvertError(f"{p}: unknown format {meta.get('format')!r} (expected {FORMAT!r})")
    return meta
