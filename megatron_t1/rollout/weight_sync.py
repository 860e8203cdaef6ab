"""Policy -> rollout engines: export HF tensors in buckets, load them, then prove parity.

After every optimizer step every engine must sample from the new policy (T1 is on-policy: the
rollout log-probs enter the importance weights and the KL estimate). One sync is:

1. :func:`push_weights`: every rank of the model replica iterates
   :func:`megatron_t1.mcore.export.iter_hf_tensors` (TP gather + PP broadcast per bucket), so every
   rank sees the full HF tensors of each bucket; ranks that hold an engine (one per rank at most) feed
   the stream into ``engine.update_weights``, where a tensor-parallel vLLM engine cuts its own TP
   slice. If an engine fails half-way, the rest of the stream is still drained so the other ranks'
   collectives complete, then the error is raised.
2. :func:`parity_by_engine`: every engine scores a few fixed token sequences; the trainer computes
   the same log-probs with a Megatron forward pass (TP/PP, :func:`megatron_t1.mcore.convert_io
   .megatron_token_logprobs`); the mean and max ``|log p_engine - log p_policy|`` of each engine are gathered
   from all ranks, so every rank sees every engine's numbers and stops together.
3. :class:`WeightSync` runs both, returns :class:`SyncResult` (logged every step) and raises
   :class:`ParityError` on every rank, naming the engines out of parity, when one exceeds the threshold.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from megatron_t1.rollout.engine import RolloutEngine


class ParityError(RuntimeError):
    """The engine's log-probs do not match the policy's after a sync: the run must stop."""


@dataclass(frozen=True)
class SyncResult:
    """What one sync did (per rank; parity is the all-rank maximum)."""

    seconds: float
    """Wall time of export + load (not the probe)."""
    bytes: int
    """Bytes of HF tensors streamed (each once, the tied head not counted twice)."""
    tensors: int
    """HF tensors loaded into this rank's engine (0 without one)."""
    probe_seconds: float = 0.0
    parity_mean_abs: float | None = None
    """Mean |log p_engine - log p_policy| over the probe tokens of the worst engine; None: no probe."""
    parity_max_abs: float | None = None
    per_engine: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Engine name -> (mean, max) |log-prob difference|, for every engine of the job."""

    @property
    def gb_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9

    def metrics(self) -> dict[str, float]:
        """Scalars for the step log (bytes and seconds of this rank's stream; every rank streams
        the whole model once per sync)."""
        out = {"sync/seconds": self.seconds, "sync/bytes": float(self.bytes), "sync/gb_per_s": self.gb_per_s}
        if self.parity_mean_abs is not None:
            out["sync/parity_mean_abs"] = self.parity_mean_abs
            out["sync/parity_max_abs"] = float(self.parity_max_abs or 0.0)
            out["sync/engines"] = float(len(self.per_engine))
        return out


def probe_sequences(vocab_size: int, *, n: int = 4, length: int = 32, seed: int = 1234) -> list[list[int]]:
    """``n`` fixed pseudo-random token sequences (the same every step: a comparable metric)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, length), generator=g).tolist()


def _drain(it: Iterator) -> None:
    for _ in it:
        pass


def push_weights(
    engine: RolloutEngine | None,
    model_chunks: Sequence[torch.nn.Module],
    cfg: Any,
    *,
    bucket_mb: float = 512,
    include_tied_lm_head: bool = True,
    buffers: Any = None,
) -> tuple[int, int, float]:
    """Stream the policy's weights into ``engine`` (None on ranks without one; they still take part
    in the collectives). ``buffers``: an :class:`megatron_t1.mcore.export.ExportBuffers` kept
    between syncs. Returns ``(tensors loaded, bytes streamed, seconds)``."""
    from megatron_t1.mcore.export import iter_hf_tensors

    counted = {"bytes": 0}

    def stream():
        last = None
        for name, t in iter_hf_tensors(
            model_chunks, cfg, bucket_mb=bucket_mb, include_tied_lm_head=include_tied_lm_head, buffers=buffers
        ):
            if t is not last:  # the tied head follows the embedding as the same tensor: count it once
                counted["bytes"] += t.numel() * t.element_size()
            last = t
            yield name, t

    start = time.perf_counter()
    it = stream()
    loaded = 0
    if engine is None:
        _drain(it)
    else:
        try:
            loaded = engine.update_weights(it)
        finally:  # keep the other ranks' collectives going even if the engine failed
            _drain(it)
    return loaded, counted["bytes"], time.perf_counter() - start


@torch.no_grad()
def policy_logprobs(model_chunks: Sequence[torch.nn.Module], cfg: Any, sequences: Sequence[Sequence[int]]):
    """``log p_policy(x_t | x_<t)`` ``[n, L - 1]`` float32 (untempered) on every rank of the replica.

    All sequences must have the same length L. Logits come from the last pipeline stage (gathered
    over TP, vocabulary padding dropped) and are broadcast over the PP group.
    """
    from megatron_t1.mcore.convert_io import megatron_token_logprobs

    lengths = {len(s) for s in sequences}
    if len(lengths) != 1:
        raise ValueError(f"probe sequences must have one length, got {sorted(lengths)}")
    tokens = torch.tensor([list(s) for s in sequences], dtype=torch.long)
    return megatron_token_logprobs(model_chunks, tokens, cfg)


def parity_by_engine(
    units: Sequence[tuple[str, RolloutEngine]],
    model_chunks: Sequence[torch.nn.Module],
    cfg: Any,
    sequences: Sequence[Sequence[int]],
    *,
    group: dist.ProcessGroup | None = None,
) -> dict[str, tuple[float, float]]:
    """``{engine name: (mean, max) |log p_engine - log p_policy|}`` over the probe tokens, for the
    engines ``units`` of every rank of ``group`` (default: all ranks), identical on every rank.

    ``units``: this rank's ``(name, engine)`` pairs (none on most ranks of a server-mode run; the
    ranks of one tensor-parallel engine report it under the same name, the worst copy counts). A
    failing or NaN-scoring engine is reported as ``inf``, never raised here, so no rank is left
    waiting in the gather.
    """
    pol = policy_logprobs(model_chunks, cfg, sequences)
    local: dict[str, tuple[float, float]] = {}
    for name, engine in units:
        try:
            eng = torch.stack([s.float() for s in engine.score(sequences)])
        except Exception:  # the run stops on the parity error, which names this engine
            local[name] = (math.inf, math.inf)
            continue
        if eng.shape != pol.shape:
            local[name] = (math.inf, math.inf)
            continue
        diff = (eng.double() - pol.double()).abs()
        diff = torch.nan_to_num(diff, nan=float("inf"))  # NaN (a broken engine) must not look small
        local[name] = (float(diff.mean()), float(diff.max()))
    parts = [local]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, local, group=group)
    merged: dict[str, tuple[float, float]] = {}
    for part in parts:
        for name, (mean, worst) in part.items():
            old = merged.get(name, (-1.0, -1.0))
            merged[name] = (max(old[0], mean), max(old[1], worst))
    return merged


def parity_probe(
    engine: RolloutEngine | None,
    model_chunks: Sequence[torch.nn.Module],
    cfg: Any,
    sequences: Sequence[Sequence[int]],
    *,
    group: dist.ProcessGroup | None = None,
) -> tuple[float, float]:
    """``(mean, max)`` of ``|log p_engine - log p_policy|`` of the worst engine over the ranks of
    ``group`` that hold one (0 where none does); see :func:`parity_by_engine`."""
    units = [] if engine is None else [("engine", engine)]
    return _worst(parity_by_engine(units, model_chunks, cfg, sequences, group=group))


def _worst(per: dict[str, tuple[float, float]]) -> tuple[float, float]:
    """The largest mean and the largest max over the engines (0 without any)."""
    return max((m for m, _ in per.values()), default=0.0), max((w for _, w in per.values()), default=0.0)


class WeightSync:
    """One object per run: bucket size, parity threshold and the fixed probe sequences.

    Args:
        cfg: the run config (``cfg.model`` for the maps; ``cfg.rollout.bucket_mb`` and
            ``cfg.rollout.parity_threshold`` are the defaults of the next two).
        bucket_mb: export bucket size in MB (512 by default).
        threshold: the largest mean |log-prob difference| a sync may leave.
        probe: token sequences for the probe (default: :func:`probe_sequences` of the vocab).
        include_tied_lm_head: send ``lm_head.weight`` for tied models (vLLM needs it).
        group: ranks that agree on the parity value (default: all).
    """

    def __init__(
        self,
        cfg: Any,
        *,
        bucket_mb: float | None = None,
        threshold: float | None = None,
        probe: Sequence[Sequence[int]] | None = None,
        include_tied_lm_head: bool = True,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        rollout = getattr(cfg, "rollout", None)
        self.cfg = cfg
        self.bucket_mb = bucket_mb if bucket_mb is not None else getattr(rollout, "bucket_mb", 512)
        self.threshold = threshold if threshold is not None else getattr(rollout, "parity_threshold", 0.05)
        self.probe = [list(s) for s in (probe or probe_sequences(cfg.model.vocab_size))]
        self.include_tied_lm_head = include_tied_lm_head
        self.group = group
        self.buffers = None  # the export's reusable buckets, created on the first sync

    def __call__(
        self,
        engine: RolloutEngine | None,
        model_chunks: Sequence[torch.nn.Module],
        *,
        check: bool = True,
        units: Sequence[tuple[str, RolloutEngine]] | None = None,
    ) -> SyncResult:
        """Sync ``engine`` (this rank's; None where the rank holds none), probe every engine of the job
        and raise :class:`ParityError` (on every rank) when one is out of parity. ``units``: the
        ``(name, engine)`` pairs this rank probes (default: ``engine`` as "rollout engine")."""
        if self.buffers is None:
            from megatron_t1.mcore.export import ExportBuffers

            self.buffers = ExportBuffers()
        loaded, nbytes, seconds = push_weights(
            engine,
            model_chunks,
            self.cfg,
            bucket_mb=self.bucket_mb,
            include_tied_lm_head=self.include_tied_lm_head,
            buffers=self.buffers,
        )
        if next(model_chunks[0].parameters()).is_cuda:
            # On a GPU the buckets go back to the allocator (a colocated vLLM wakes its KV cache next);
            # on CPU they are kept, since fresh pages cost more than the copies (mcore/export.py).
            self.buffers.clear()
        if units is None:
            units = [] if engine is None else [("rollout engine", engine)]
        start = time.perf_counter()
        per = parity_by_engine(units, model_chunks, self.cfg, self.probe, group=self.group)
        mean, worst = _worst(per)
        result = SyncResult(seconds, nbytes, loaded, time.perf_counter() - start, mean, worst, per)
        bad = {name: v for name, v in per.items() if not v[0] <= self.threshold}
        if check and bad:
            names = "; ".join(f"{name}: mean {m:.4g}, max {w:.4g}" for name, (m, w) in sorted(bad.items()))
            raise ParityError(
                f"weight sync broke parity on {len(bad)} of {len(per)} rollout engine(s) ({names}): their "
                f"log-probs differ from the policy's over {len(self.probe)} probe sequences by more than "
                f"rollout.parity_threshold={self.threshold}. The engine is not running the trained "
                "weights (a tensor missing or mis-mapped, a tied lm_head not sent, a dtype or vocab "
                "mismatch, or the engine failed while scoring); stopping the run."
            )
        return result
