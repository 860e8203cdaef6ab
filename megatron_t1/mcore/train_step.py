"""One optimizer step: Megatron's pipeline schedule over micro-batches, grad clip, Adam, LR schedule.

Loss functions follow Megatron's per-token contract (``calculate_per_token_loss=True``):
``loss_fn(output) -> (loss_sum, num_tokens, metrics)``. The schedule backpropagates each
micro-batch's *sum*; ``finalize_model_grads`` all-reduces gradients over DP and divides them by the
token count of the whole global batch. The result is a token-mean over the global batch, whatever
the split into micro-batches and DP ranks (not a mean of per-micro-batch means).

``metrics`` maps a name to a 2-vector ``[sum, count]``; :func:`train_step` adds them over
micro-batches and DP ranks and reports ``sum / count`` once per step (no ``.item()`` per micro-batch).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_t1.config import Config
from megatron_t1.errors import TrainingError
from megatron_t1.mcore.forward import schedule_iterators
from megatron_t1.mcore.model import unwrap
from megatron_t1.mcore.moe import RouterLoad


@dataclass
class StepResult:
    """What one optimizer step reports (plain floats, reduced over DP and PP)."""

    loss: float
    grad_norm: float
    lr: float
    tokens: int
    skipped: bool
    metrics: dict[str, float] = field(default_factory=dict)
    moe: dict[str, float] = field(default_factory=dict)
    """MoE router load balance of the step (:mod:`megatron_t1.mcore.moe`); empty for a dense model."""


def build_optimizer(cfg: Config, chunks: Sequence[torch.nn.Module]):
    """Megatron Adam (fp32 master weights under bf16) + warmup/decay schedule over ``run.train_steps``.

    Also wires the model config hooks the schedule needs (grad finalisation, no_sync, loss scale).
    """
    o = cfg.optim
    ocfg = OptimizerConfig(
        optimizer=o.optimizer,
        sgd_momentum=o.sgd_momentum,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=cfg.model.precision == "bf16",
        params_dtype=torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(ocfg, list(chunks))
    steps = cfg.run.train_steps
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.lr_warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_steps,
        lr_decay_steps=max(steps, o.lr_warmup_steps + 1),
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(steps, 1),
        wd_incr_style="constant",
    )
    tcfg = unwrap(chunks[0]).config
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.grad_scale_func = optimizer.scale_loss
    tcfg.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    return optimizer, scheduler


def reduce_metrics(per_microbatch: list[dict], device: torch.device) -> dict[str, tuple[float, float]]:
    """Sum ``{name: [sum, count]}`` over micro-batches, then over DP ranks and pipeline stages
    (only the last stage holds losses), so every rank gets the same totals."""
    names = sorted({k for d in per_microbatch for k in d})
    world_pp = ps.get_pipeline_model_parallel_world_size()
    # Every stage must agree on the names: broadcast from the last stage when PP > 1.
    if world_pp > 1:
        holder = [names]
        dist.broadcast_object_list(
            holder,
            src=ps.get_pipeline_model_parallel_last_rank(),
            group=ps.get_pipeline_model_parallel_group(),
        )
        names = holder[0]
    if not names:
        return {}
    totals = torch.zeros(len(names), 2, dtype=torch.float64, device=device)
    for d in per_microbatch:
        for i, n in enumerate(names):
            if n in d:
                totals[i] += d[n].detach().to(torch.float64).view(2)
    dist.all_reduce(totals, group=ps.get_data_parallel_group())
    if world_pp > 1:
        dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
    return {n: (float(totals[i, 0]), float(totals[i, 1])) for i, n in enumerate(names)}


class SkipGuard:
    """Counts skipped (non-finite) steps in a row; ``max_in_row`` of them raise :class:`TrainingError`."""

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row = max_in_row
        self.in_row = 0

    def update(self, skipped: bool, step: int) -> None:
        self.in_row = self.in_row + 1 if skipped else 0
        if self.in_row >= self.max_in_row:
            raise TrainingError(
                f"step {step}: {self.in_row} steps in a row had a non-finite loss or gradient "
                f"(run.max_skipped_steps={self.max_in_row}); stopping. Lower optim.lr, check the data, "
                "or restart from an earlier checkpoint."
            )


def _as_list(x) -> list:
    return x if isinstance(x, list) else []


def _nonfinite_grads(chunks: Sequence[torch.nn.Module]) -> bool:
    """True on every rank when any rank holds a NaN/inf gradient (after the DP reduction).

    One ``isfinite`` pass over each contiguous DDP gradient buffer, then one all-reduce (MAX) of a
    flag over all ranks: TP/PP ranks hold different shards, and with the distributed optimizer DP
    ranks may too.
    """
    bad = False
    for c in chunks:
        # Megatron DDP's list attribute ``buffers`` shadows nn.Module.buffers(); plain modules have none.
        buffers = [
            b for name in ("buffers", "expert_parallel_buffers") for b in _as_list(getattr(c, name, None))
        ]
        if buffers:
            bad = bad or any(not bool(torch.isfinite(b.grad_data).all()) for b in buffers)
        else:
            grads = [getattr(p, "main_grad", p.grad) for p in c.parameters()]
            bad = bad or any(g is not None and not bool(torch.isfinite(g).all()) for g in grads)
    flag = torch.tensor([1.0 if bad else 0.0], device=next(unwrap(chunks[0]).parameters()).device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def train_step(
    chunks: Sequence[torch.nn.Module],
    optimizer,
    scheduler,
    forward_step_func: Callable,
    microbatches: Sequence[dict],
    *,
    seq_length: int,
    micro_batch_size: int,
    loss_metric: str = "loss",
) -> StepResult:
    """Forward/backward over this rank's micro-batches, then one optimizer step.

    ``microbatches`` are this DP rank's share of the global batch (on any device: each is moved to
    the model's when it is used). A non-finite gradient norm
    skips the update (the step reports ``skipped=True``) and leaves weights untouched.
    """
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    fb = get_forward_backward_func()
    load = RouterLoad.for_model(chunks)
    with load.counting() if load is not None else contextlib.nullcontext():
        outputs = fb(
            forward_step_func=forward_step_func,
            data_iterator=schedule_iterators(microbatches, chunks),
            model=list(chunks),
            num_microbatches=len(microbatches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=False,
        )
    if _nonfinite_grads(chunks):
        # Megatron's fp32 optimizer would step with NaN gradients (it only checks under a loss
        # scaler), so the check comes first: nothing is applied, Adam's moments stay untouched.
        optimizer.zero_grad()
        ok, grad_norm = False, float("nan")
    else:
        ok, grad_norm, _ = optimizer.step()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    skipped = not ok or not math.isfinite(grad_norm)
    if not skipped:
        scheduler.step(increment=1)
    device = next(unwrap(chunks[0]).parameters()).device
    totals = reduce_metrics(outputs if ps.is_pipeline_last_stage(ignore_virtual=True) else [], device)
    metrics = {k: s / max(c, 1e-12) for k, (s, c) in totals.items()}
    loss_sum, tokens = totals.get(loss_metric, (float("nan"), 0.0))
    return StepResult(
        loss=loss_sum / max(tokens, 1.0),
        grad_norm=grad_norm,
        lr=optimizer.param_groups[0]["lr"],
        tokens=int(tokens),
        skipped=skipped,
        metrics=metrics,
        moe=load.metrics() if load is not None else {},
    )


@torch.no_grad()
def forward_only(
    chunks: Sequence[torch.nn.Module],
    forward_step_func: Callable,
    microbatches: Sequence[dict],
    *,
    seq_length: int,
    micro_batch_size: int,
) -> dict[str, float]:
    """Evaluation pass through the same schedule (no grads); returns reduced ``sum / count`` metrics."""
    fb = get_forward_backward_func()
    outputs = fb(
        forward_step_func=forward_step_func,
        data_iterator=schedule_iterators(microbatches, chunks),
        model=list(chunks),
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=True,
    )
    device = next(unwrap(chunks[0]).parameters()).device
    totals = reduce_metrics(outputs if ps.is_pipeline_last_stage(ignore_virtual=True) else [], device)
    return {k: s / max(c, 1e-12) for k, (s, c) in totals.items()}
