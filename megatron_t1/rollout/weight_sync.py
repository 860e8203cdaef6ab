"""Policy -> rollout engine: export HF tensors in buckets, load them, then prove parity.

After every optimizer step the engine must sample from the new policy (T1 is on-policy: the
rollout log-probs enter the importance weights and the KL estimate). One sync is:

1. :func:`push_weights`: every rank of the model replica iterates
   :func:`megatron_t1.mcore.export.iter_hf_tensors` (TP gather + PP broadcast per bucket); ranks
   that own an engine feed the stream into ``engine.update_weights``. If the engine fails half-way,
   the rest of the stream is still drained so the other ranks' collectives complete, then the
   error is raised.
2. :func:`parity_probe`: the engine scores a few fixed token sequences; the trainer computes the
   same log-probs with a Megatron forward pass (TP/PP, :func:`megatron_t1.mcore.convert_io
   .megatron_logits`); the mean ``|log p_engine - log p_policy|`` over all probe tokens is reduced
   (max) over all ranks, so every rank sees the same number and stops together.
3. :class:`WeightSync` runs both, returns :class:`SyncResult` (logged every step) and raises
   :class:`ParityError` on every rank when the difference exceeds the threshold.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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
    """Mean |log p_engine - log p_policy| over the probe tokens (max over ranks); None: no probe."""
    parity_max_abs: float | None = None

    @property
    def gb_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9

    def metrics(self) -> dict[str, float]:
        """Scalars for the step log."""
        out = {"sync/seconds": self.seconds, "sync/gb_per_s": self.gb_per_s}
        if self.parity_mean_abs is not None:
            out["sync/parity_mean_abs"] = self.parity_mean_abs
            out["sync/parity_max_abs"] = float(self.parity_max_abs or 0.0)
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
    from megatron.core import parallel_state as ps

    from megatron_t1.mcore.convert_io import megatron_logits

    lengths = {len(s) for s in sequences}
    if len(lengths) != 1:
        raise ValueError(f"probe sequences must have one length, got {sorted(lengths)}")
    tokens = torch.tensor([list(s) for s in sequences], dtype=torch.long)
    modes = [c.training for c in model_chunks]
    try:
        logits = megatron_logits(model_chunks, tokens, cfg)
    finally:
        for c, m in zip(model_chunks, modes):
            c.train(m)
    n, length = tokens.shape
    out = torch.empty(n, length - 1, dtype=torch.float32)
    if logits is not None:
        out.copy_(torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, tokens[:, 1:, None])[..., 0])
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp > 1:
        device = next(model_chunks[0].parameters()).device
        buf = out.to(device)
        dist.broadcast(buf, group=ps.get_pipeline_model_parallel_group(), group_src=pp - 1)
        out = buf.cpu()
    return out


def parity_probe(
    engine: RolloutEngine | None,
    model_chunks: Sequence[torch.nn.Module],
    cfg: Any,
    sequences: Sequence[Sequence[int]],
    *,
    group: dist.ProcessGroup | None = None,
) -> tuple[float, float]:
    """``(mean, max)`` of ``|log p_engine - log p_policy|`` over all probe tokens, maximised over
    the ranks of ``group`` (default: all ranks) that hold an engine (0 where none does)."""
    pol = policy_logprobs(model_chunks, cfg, sequences)
    stats = torch.zeros(2, dtype=torch.float64)
    if engine is not None:
        eng = torch.stack([s.float() for s in engine.score(sequences)])
        if eng.shape != pol.shape:
            raise ParityError(f"engine scored shape {tuple(eng.shape)}, the policy {tuple(pol.shape)}")
        diff = (eng.double() - pol.double()).abs()
        # NaN (a broken engine) must not compare as small: it becomes +inf.
        diff = torch.nan_to_num(diff, nan=float("inf"))
        stats = torch.stack([diff.mean(), diff.max()])
    if dist.is_initialized():
        device = next(model_chunks[0].parameters()).device
        buf = stats.to(device=device, dtype=torch.float32)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
        stats = buf.double().cpu()
    return float(stats[0]), float(stats[1])


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
        self, engine: RolloutEngine | None, model_chunks: Sequence[torch.nn.Module], *, check: bool = True
    ) -> SyncResult:
        """Sync, probe, and raise :class:`ParityError` (on every rank) when parity is broken."""
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
        start = time.perf_counter()
        mean, worst = parity_probe(engine, model_chunks, self.cfg, self.probe, group=self.group)
        result = SyncResult(seconds, nbytes, loaded, time.perf_counter() - start, mean, worst)
        if check and not mean <= self.threshold:
            raise ParityError(
                f"weight sync broke parity: the rollout engine's log-probs differ from the policy's by "
                f"{mean:.4g} on average (max {worst:.4g}) over {len(self.probe)} probe sequences, above "
                f"rollout.parity_threshold={self.threshold}. The engine is not running the trained "
                "weights (a tensor missing or mis-mapped, a tied lm_head not sent, a dtype or vocab "
                "mismatch); stopping the run."
            )
        return result
