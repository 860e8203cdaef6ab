"""Stream HF-named *full* tensors out of a Megatron model sharded over TP / PP (weight sync, tools).

Every rank of a model replica (its TP x PP ranks) iterates the same stream in lockstep, because
producing it takes collectives:

1. **Plan** (:func:`export_plan`, config only, identical on every rank): the model's full Megatron
   tensors in checkpoint order (the converter maps, :meth:`ArchSpec.tensor_maps`), each with the
   pipeline stage that owns it, grouped into buckets of at most ``bucket_mb`` full bytes that never
   span two stages.
2. **Gather across TP**: the owner stage packs its TP shards of a bucket into one flat buffer and
   runs *one* ``all_gather_into_tensor`` over its TP group (replicated tensors, e.g. norms, are not
   gathered). Each full tensor is written straight from the gathered ``[tp, ...]`` buffer into its
   slot of the bucket's full buffer with one strided copy (:func:`merge_gathered`, the inverse of
   :func:`megatron_t1.convert.sharding.split_tp`; tested against ``merge_tp``).
3. **Send across EP, then PP**: under expert parallelism an expert's bucket lives on one EP rank of
   its stage (experts never share a bucket with tensors of another EP rank); it is broadcast from
   there over the EP group. Then the full bucket is broadcast from the owner stage over the PP
   group, so every rank ends with the same full tensors.
4. **Name**: each full tensor goes through the converter's ``to_hf`` (QKV split per KV group,
   ``[gate; up]`` split, vocabulary padding dropped) and is yielded with its HF name.

Memory: two buckets' local shards, gathered shards and full tensors (double buffering, reused
across syncs through :class:`ExportBuffers`). Yielded tensors are views into those buffers: valid
while the next bucket is consumed, overwritten after it.

With tied embeddings HF checkpoints omit ``lm_head.weight``; ``include_tied_lm_head=True`` yields
the embedding a second time under that name (vLLM keeps its own head tensor and silently keeps the
old one otherwise).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_t1.config import Config
from megatron_t1.convert.maps import ArchSpec, ConvertError, Dims, TensorMap, TPRule, to_hf
from megatron_t1.convert.registry import spec_for_arch
from megatron_t1.convert.sharding import expert_index, layer_offset, layer_range
from megatron_t1.mcore.convert_io import global_map_name
from megatron_t1.mcore.model import unwrap

DEFAULT_BUCKET_MB = 512


@dataclass(frozen=True)
class ExportItem:
    """One full Megatron tensor of the plan."""

    tm: TensorMap
    """The converter map (global name, HF names, full shape with vocab padded for this TP)."""
    pp_rank: int
    """Pipeline stage that holds it."""
    vp_stage: int
    """Model chunk (virtual stage) on that rank (0 without VPP)."""
    local_shape: tuple[int, ...]
    """Shape of one TP shard (the full shape for replicated tensors)."""
    ep_rank: int | None = None
    """EP rank that holds this expert tensor; None: every EP rank has it (all but routed experts)."""

    @property
    def gathered(self) -> bool:
        return self.tm.tp != "replicated"


@dataclass(frozen=True)
class Bucket:
    """Consecutive plan items of one stage (and one EP rank) whose full tensors fit in one buffer."""

    pp_rank: int
    items: tuple[ExportItem, ...]

    @property
    def ep_rank(self) -> int | None:
        return self.items[0].ep_rank

    @property
    def full_numel(self) -> int:
        return sum(_numel(i.tm.shape) for i in self.items)

    @property
    def local_numel(self) -> int:
        """Elements of one rank's packed shards (replicated tensors are not gathered)."""
        return sum(_numel(i.local_shape) for i in self.items if i.gathered)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def local_shape(shape: tuple[int, ...], rule: TPRule, tp: int) -> tuple[int, ...]:
    """The shape of one TP shard of a full tensor."""
    if rule == "replicated" or tp == 1:
        return shape
    dim = -1 if rule == "row" else 0
    if shape[dim] % tp:
        raise ConvertError(f"dimension {shape[dim]} of a {rule} tensor is not divisible by TP={tp}")
    out = list(shape)
    out[dim] //= tp
    return tuple(out)


def export_plan(
    cfg: Config,
    *,
    tp: int,
    pp: int,
    vpp: int | None = None,
    ep: int = 1,
    bucket_mb: float = DEFAULT_BUCKET_MB,
    spec: ArchSpec | None = None,
    dtype_bytes: int = 4,
) -> list[Bucket]:
    """The buckets of a model at layout ``tp`` x ``pp`` (x ``vpp``, x ``ep`` experts), from the config
    alone.

    Order: the converter's checkpoint order (embedding, layers, final norm, head); with tied
    embeddings the head is the embedding and is not in the plan. A bucket holds the tensors of one
    stage and, under EP, of one EP rank (routed experts) or of all (everything else).
    """
    spec = spec or spec_for_arch(cfg.model.arch)
    maps = spec.tensor_maps(cfg.model, tp=tp)
    layers = cfg.model.num_layers
    chunks = vpp or 1
    owner_of_layer: dict[int, tuple[int, int]] = {}
    for p in range(pp):
        for v in range(chunks):
            for i in layer_range(layers, pp, p, vpp, v if vpp else None):
                owner_of_layer[i] = (p, v)
    per_ep_rank = (cfg.model.num_experts or 0) // ep
    limit = max(1, int(bucket_mb * 2**20))
    buckets: list[Bucket] = []
    current: list[ExportItem] = []
    current_bytes = 0
    for tm in maps:
        if tm.layer is not None:
            p, v = owner_of_layer[tm.layer]
        elif tm.mcore.startswith("embedding."):
            p, v = 0, 0
        else:  # final norm, output layer
            p, v = pp - 1, chunks - 1
        e = expert_index(tm.mcore)
        owner = e // per_ep_rank if e is not None and ep > 1 else None
        item = ExportItem(tm, p, v, local_shape(tm.shape, tm.tp, tp), owner)
        nbytes = _numel(tm.shape) * dtype_bytes
        if current and (
            (current[0].pp_rank, current[0].ep_rank) != (p, owner) or current_bytes + nbytes > limit
        ):
            buckets.append(Bucket(current[0].pp_rank, tuple(current)))
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += nbytes
    if current:
        buckets.append(Bucket(current[0].pp_rank, tuple(current)))
    return buckets


def hf_tensor_names(cfg: Config, *, include_tied_lm_head: bool = False, spec: ArchSpec | None = None):
    """``[(hf_name, full HF shape)]`` in the order :func:`iter_hf_buckets` yields them (no data moved:
    the layout code runs on meta tensors). Used to announce a transfer (vLLM's NCCL metadata)."""
    spec = spec or spec_for_arch(cfg.model.arch)
    d = Dims.of(cfg.model)
    out = []
    for tm in spec.tensor_maps(cfg.model, tp=1):
        for name, t in to_hf(tm, torch.empty(tm.shape, device="meta"), d):
            out.append((name, tuple(t.shape)))
            if include_tied_lm_head and d.tied and tm.kind == "vocab":
                out.append((spec.names.lm_head, tuple(t.shape)))
    return out


def merge_gathered(dst: torch.Tensor, gathered: torch.Tensor, rule: TPRule, tp: int) -> None:
    """Write the full tensor ``dst`` from ``gathered`` ``[tp, *local_shape]`` (rank-ordered shards).

    One strided copy per rule (``H``: input width, ``R``: rows, ``C``: columns, ``F``: MLP width):
    column / vocab: ``dst [R, ...] = gathered.reshape(R, ...)``; row: ``dst [H, C]`` viewed
    ``[H, tp, C/tp]`` = ``gathered.permute(1, 0, 2)``; gated_column: ``dst [2F, ...]`` viewed
    ``[2, tp, F/tp, ...]`` = ``gathered [tp, 2, F/tp, ...].transpose(0, 1)`` (rank r holds
    ``[gate_r; up_r]``).
    """
    local = gathered.shape[1:]
    if rule == "replicated":
        dst.copy_(gathered[0])
    elif rule in ("column", "vocab"):
        dst.view(tp, *local).copy_(gathered)
    elif rule == "row":
        lead = local[:-1]
        dst.view(*lead, tp, local[-1]).copy_(gathered.movedim(0, -2))
    elif rule == "gated_column":
        half = local[0] // 2
        src = gathered.view(tp, 2, half, *local[1:]).transpose(0, 1)
        dst.view(2, tp, half, *local[1:]).copy_(src)
    else:
        raise ConvertError(f"unknown TP rule {rule!r}")


def _local_params(
    model_chunks: Sequence[torch.nn.Module], cfg: Config, pp: int, pp_rank: int, ep: int = 1, ep_rank: int = 0
):
    """``{(global local-spec name, vp_stage): parameter}`` of this rank's chunks (global layer and
    expert indices)."""
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    expert_offset = ep_rank * (cfg.model.num_experts or 0) // ep
    out: dict[tuple[str, int], torch.Tensor] = {}
    for v, chunk in enumerate(model_chunks):
        model = unwrap(chunk)
        offset = layer_offset(cfg.model.num_layers, pp, pp_rank, vpp, v if vpp else None)
        for local_name, param in model.named_parameters():
            out[(global_map_name(local_name, offset, expert_offset), v)] = param
    return out


class ExportBuffers:
    """Flat buffers reused by :func:`iter_hf_buckets`, two slots (double buffering), kept across
    syncs by their owner (e.g. :class:`megatron_t1.rollout.weight_sync.WeightSync`).

    Reuse matters on CPU: a fresh multi-hundred-MB ``torch.empty`` is a new mapping whose pages the
    kernel zero-fills on first touch, which cost more than the copies themselves.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, int], torch.Tensor] = {}

    def get(self, kind: str, slot: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat tensor of exactly ``numel`` elements (a view of the cached one, grown if needed)."""
        t = self._bufs.get((kind, slot))
        if t is None or t.numel() < numel or t.dtype != dtype or t.device != device:
            t = torch.empty(numel, dtype=dtype, device=device)
            self._bufs[(kind, slot)] = t
        return t[:numel]

    def clear(self) -> None:
        self._bufs.clear()


@torch.no_grad()
def iter_hf_buckets(
    model_chunks: Sequence[torch.nn.Module],
    cfg: Config,
    *,
    bucket_mb: float = DEFAULT_BUCKET_MB,
    include_tied_lm_head: bool = False,
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
    ep_group: dist.ProcessGroup | None = None,
    spec: ArchSpec | None = None,
    buffers: ExportBuffers | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield, bucket by bucket, ``[(hf_name, full tensor)]`` of the whole model on every rank.

    Must be iterated to the end on every rank of the replica (collectives; under EP the replica
    spans the EP ranks too). Groups default to Megatron's TP, PP and EP groups (after
    ``init_parallel``; the EP group only when ``parallel.expert_model_parallel_size > 1``).

    Pipelined: bucket k+1 is packed and its TP ``all_gather`` started (asynchronously) before
    bucket k is merged and handed to the consumer, so the transfer overlaps the engine's copy.
    The yielded tensors are views into reused buffers: those of bucket k stay valid while bucket
    k+1 is consumed and are overwritten when bucket k+2 is produced (copy what you keep longer).
    """
    spec = spec or spec_for_arch(cfg.model.arch)
    tp_group = tp_group if tp_group is not None else ps.get_tensor_model_parallel_group()
    pp_group = pp_group if pp_group is not None else ps.get_pipeline_model_parallel_group()
    tp = dist.get_world_size(tp_group)
    pp, pp_rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
    if ep_group is None and cfg.model.num_experts and cfg.parallel.ep > 1:
        ep_group = ps.get_expert_model_parallel_group()
    ep, ep_rank = (dist.get_world_size(ep_group), dist.get_rank(ep_group)) if ep_group is not None else (1, 0)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    params = _local_params(model_chunks, cfg, pp, pp_rank, ep, ep_rank)
    dtypes = {p.dtype for p in params.values()}
    if len(dtypes) != 1:
        raise ConvertError(f"export needs one parameter dtype, this rank has {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    device = next(iter(params.values())).device
    d = Dims.of(cfg.model)
    plan = export_plan(
        cfg, tp=tp, pp=pp, vpp=vpp, ep=ep, bucket_mb=bucket_mb, spec=spec, dtype_bytes=dtype.itemsize
    )
    buffers = buffers if buffers is not None else ExportBuffers()
    max_full = max(b.full_numel for b in plan)
    max_local = max(b.local_numel for b in plan)

    def start(k: int):
        """Owner stage (and EP rank) of bucket k: pack its shards into slot k % 2 and launch the TP
        gather."""
        bucket, slot = plan[k], k % 2
        if bucket.pp_rank != pp_rank or bucket.ep_rank not in (None, ep_rank):
            return None
        packed = buffers.get("packed", slot, max_local, dtype, device)[: bucket.local_numel]
        offset = 0
        for item in bucket.items:
            if item.gathered:
                n = _numel(item.local_shape)
                packed[offset : offset + n].view(item.local_shape).copy_(_find(params, item))
                offset += n
        if tp == 1 or bucket.local_numel == 0:
            return packed.view(1, -1), None
        gathered = buffers.get("gathered", slot, tp * max_local, dtype, device)[: tp * bucket.local_numel]
        work = dist.all_gather_into_tensor(gathered, packed, group=tp_group, async_op=True)
        return gathered.view(tp, -1), work

    pending = start(0)
    for k, bucket in enumerate(plan):
        current = pending
        if current is not None and current[1] is not None:
            current[1].wait()
        pending = start(k + 1) if k + 1 < len(plan) else None
        full = buffers.get("full", k % 2, max_full, dtype, device)[: bucket.full_numel]
        if current is not None:
            _merge_bucket(full, bucket, current[0], params)
        if bucket.ep_rank is not None and bucket.pp_rank == pp_rank:
            dist.broadcast(full, group=ep_group, group_src=bucket.ep_rank)
        if pp > 1:
            dist.broadcast(full, group=pp_group, group_src=bucket.pp_rank)
        out: list[tuple[str, torch.Tensor]] = []
        offset = 0
        for item in bucket.items:
            n = _numel(item.tm.shape)
            tensor = full[offset : offset + n].view(item.tm.shape)
            offset += n
            for name, t in to_hf(item.tm, tensor, d):
                out.append((name, t))
                if include_tied_lm_head and d.tied and item.tm.kind == "vocab":
                    out.append((spec.names.lm_head, t))
        yield out


def _merge_bucket(full: torch.Tensor, bucket: Bucket, gathered: torch.Tensor, params: dict) -> None:
    """Write the bucket's full tensors into ``full`` from the gathered shards ``[tp, local_numel]``
    (replicated tensors straight from the local parameter)."""
    g_off = f_off = 0
    for item in bucket.items:
        n_full = _numel(item.tm.shape)
        dst = full[f_off : f_off + n_full].view(item.tm.shape)
        f_off += n_full
        if item.gathered:
            n = _numel(item.local_shape)
            shards = gathered[:, g_off : g_off + n].view(gathered.shape[0], *item.local_shape)
            g_off += n
            merge_gathered(dst, shards, item.tm.tp, gathered.shape[0])
        else:
            dst.copy_(_find(params, item))


def _find(params, item: ExportItem) -> torch.Tensor:
    p = params.get((item.tm.mcore, item.vp_stage))
    if p is None:
        raise ConvertError(f"export: this rank should hold {item.tm.mcore} (chunk {item.vp_stage})")
    if tuple(p.shape) != item.local_shape:
        raise ConvertError(
            f"export: {item.tm.mcore} has local shape {tuple(p.shape)}, the plan says {item.local_shape}"
        )
    return p


def iter_hf_tensors(
    model_chunks: Sequence[torch.nn.Module], cfg: Config, **kwargs
) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`iter_hf_buckets` flattened to one ``(hf_name, tensor)`` at a time."""
    for bucket in iter_hf_buckets(model_chunks, cfg, **kwargs):
        yield from bucket
