"""T1 stage 1: supervised fine-tuning on trial-and-error, self-verifying traces (arXiv 2501.11651 §3.1).

``python -m megatron_t1 sft --config FILE [--set a.b=c ...]``; under torchrun for TP/PP/DP.

Reads top to bottom: parallel init -> tokenizer + packed data -> model + optimizer -> resume or
init_from -> loop(global batch -> train_step -> log -> checkpoint) -> final checkpoint.
The data order is a pure function of (data.seed, step): resume continues with the same batches.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from megatron_t1.config import Config, ConfigError, save_config
from megatron_t1.data.order import step_slice
from megatron_t1.data.packing import PackedSeq, micro_batches, pack_sequences, schedule_shape
from megatron_t1.data.sft import SFTDataset
from megatron_t1.log import RunLogger
from megatron_t1.mcore.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    resolve_init_from,
    save_checkpoint,
)
from megatron_t1.mcore.forward import sft_forward_step
from megatron_t1.mcore.model import build_model, packed_layout
from megatron_t1.mcore.parallel import ParallelContext, init_parallel
from megatron_t1.mcore.train_step import SkipGuard, forward_only, train_step


def load_tokenizer(cfg: Config):
    """The run's HF tokenizer; its vocabulary must fit ``model.vocab_size``."""
    from transformers import AutoTokenizer

    if not cfg.model.tokenizer:
        raise ConfigError("model.tokenizer: a tokenizer folder is required for SFT")
    if not Path(cfg.model.tokenizer).is_dir():
        raise ConfigError(f"model.tokenizer: no tokenizer folder at {cfg.model.tokenizer}")
    tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    if len(tok) > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} < tokenizer size {len(tok)} ({cfg.model.tokenizer})"
        )
    return tok


def rank_microbatches(
    rows: list[PackedSeq], ctx: ParallelContext, micro: int, pad_id: int, layout: str = "thd"
) -> list[dict]:
    """This DP rank's contiguous share of the global batch, as CPU tensors in ``layout``
    (the step moves each micro-batch to the device when it runs it)."""
    per_rank = len(rows) // ctx.dp
    mine = rows[ctx.dp_rank * per_rank : (ctx.dp_rank + 1) * per_rank]
    return list(micro_batches(mine, micro, ignore_index=pad_id, layout=layout))


def run_sft(cfg: Config) -> dict:
    """Train; returns a summary (final loss, steps, wall time, run folder)."""
    t_start = time.perf_counter()
    ctx = init_parallel(cfg.parallel, seed=cfg.run.seed, device=cfg.run.device)
    cfg.validate(world_size=ctx.world_size, stage="sft")
    run_dir = cfg.run.run_dir
    if ctx.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    tok = load_tokenizer(cfg)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seq = cfg.data.seq_length
    examples = SFTDataset(
        cfg.data.train_path, tok, max_len=seq, messages_field=cfg.data.messages_field
    ).load()
    rows = pack_sequences(examples, seq, pad_id)
    valid_rows = []
    if cfg.data.valid_path:
        valid = SFTDataset(cfg.data.valid_path, tok, max_len=seq, messages_field=cfg.data.messages_field)
        valid_rows = pack_sequences(valid.load(), seq, pad_id)

    chunks = build_model(cfg)
    layout = packed_layout(cfg)
    sched_seq, sched_micro = schedule_shape(layout, seq, cfg.data.micro_batch_size)
    from megatron_t1.mcore.train_step import build_optimizer

    optimizer, scheduler = build_optimizer(cfg, chunks)
    ckpt_root = run_dir / "checkpoints"
    start = 0
    latest = latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
    if latest is not None:
        start = load_checkpoint(latest, cfg, chunks, optimizer, scheduler)["step"]
    elif cfg.checkpoint.init_from:
        load_checkpoint(resolve_init_from(cfg.checkpoint.init_from), cfg, chunks, weights_only=True)

    logger = RunLogger.for_run(cfg, enabled=ctx.is_logging_rank, start_step=start, desc="sft")
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    logger.info(
        f"sft: {len(examples)} conversations -> {len(rows)} packed rows of {seq} tokens; "
        f"{n_params / 1e6:.2f}M params on this rank; TP={ctx.tp} PP={ctx.pp} DP={ctx.dp}; "
        f"{'resuming at step ' + str(start) if start else 'from step 0'}"
    )
    res = None
    tokens_since_log = 0
    guard = SkipGuard(cfg.run.max_skipped_steps)
    for step in range(start, cfg.run.train_steps):
        batch = step_slice(rows, step, cfg.data.global_batch_size, cfg.data.seed)
        mbs = rank_microbatches(batch, ctx, cfg.data.micro_batch_size, pad_id, layout)
        res = train_step(
            chunks,
            optimizer,
            scheduler,
            sft_forward_step,
            mbs,
            seq_length=sched_seq,
            micro_batch_size=sched_micro,
        )
        done = step + 1
        tokens_since_log += res.tokens
        if res.skipped:
            logger.info(f"step {done}: non-finite gradient norm, update skipped")
        guard.update(res.skipped, done)
        if done % cfg.log.interval == 0 or done == cfg.run.train_steps:
            scalars = {"loss": res.loss, "lr": res.lr, "grad_norm": res.grad_norm, **res.moe}
            logger.step(done, scalars, tokens=tokens_since_log)
            tokens_since_log = 0
        last = done == cfg.run.train_steps
        exit_now = cfg.run.exit_interval is not None and done % cfg.run.exit_interval == 0 and not last
        if last or exit_now or (cfg.checkpoint.save_interval and done % cfg.checkpoint.save_interval == 0):
            save_checkpoint(ckpt_root, done, cfg, chunks, optimizer, scheduler, state={"kind": "sft"})
        if exit_now:
            logger.info(f"exit_interval: stopping after step {done} (checkpoint saved; rerun to resume)")
            break

    summary = {
        "run_dir": str(run_dir),
        "steps": cfg.run.train_steps,
        "final_loss": res.loss if res else math.nan,
        "wall_seconds": time.perf_counter() - t_start,
    }
    if valid_rows:
        mbs = list(micro_batches(valid_rows, cfg.data.micro_batch_size, ignore_index=pad_id, layout=layout))
        mbs = mbs[ctx.dp_rank :: ctx.dp] or mbs[:1]
        summary["valid_loss"] = forward_only(
            chunks, sft_forward_step, mbs, seq_length=sched_seq, micro_batch_size=sched_micro
        ).get("loss", math.nan)
        logger.info(f"validation loss {summary['valid_loss']:.4f}")
    logger.close()
    return summary
