"""T1 stage 2: RL with oversampling, rule-based rewards, an entropy bonus and a dynamic anchor.

``python -m megatron_t1 rl --config FILE [--set a.b=c ...]`` (torchrun for TP/PP/DP). One step, top to
bottom (arXiv 2501.11651 §3.2; ``../shared/T1.md``):

    rollout (K per prompt, tau) -> reward {1, 0, -1} -> keep k of K -> policy + anchor log-probs
    -> KL_i (k1) -> A_i = s_i - mean_{j!=i} s_j, s_i = r_i - beta KL_i -> train step -> anchor update
    -> weight sync (+ parity probe) -> held-out eval (every eval_every) -> checkpoint -> log

Rollouts run on global rank 0 (the HF engine on CPU; vLLM on GPU clusters) and are broadcast;
every rank holds the same responses and trains its DP share. Responses are laid out one per row,
padded to ``data.seq_length`` (packing across responses is an open item). A run resumes from its
own ``latest`` checkpoint (policy, optimizer, anchor, data position); otherwise it starts from
``checkpoint.init_from`` with the anchor equal to the starting policy.
"""

from __future__ import annotations

import time
from functools import partial

import torch
import torch.distributed as dist

from megatron_t1.config import Config, ConfigError, save_config
from megatron_t1.data.prompts import load_prompts, step_prompts
from megatron_t1.data.synthetic import prompt_messages
from megatron_t1.log import RunLogger
from megatron_t1.mcore.anchor_store import AnchorStore
from megatron_t1.mcore.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    resolve_init_from,
    save_checkpoint,
)
from megatron_t1.mcore.model import build_model
from megatron_t1.mcore.parallel import ParallelContext, init_parallel
from megatron_t1.mcore.rl_forward import compute_logprobs, rl_forward_step
from megatron_t1.mcore.train_step import build_optimizer, train_step
from megatron_t1.rl.advantage import t1_advantages
from megatron_t1.rl.oversample import select_responses
from megatron_t1.train.sft import load_tokenizer


def _broadcast(obj, ctx: ParallelContext):
    if ctx.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _make_engine(cfg: Config, tok):
    """An HF engine holding a model of the policy's shape; the first weight sync fills it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_t1.convert.registry import spec_for_arch
    from megatron_t1.rollout.hf_engine import HFEngine

    if cfg.rollout.engine != "hf":
        raise ConfigError("rollout.engine: the RL loop drives the hf engine for now (vLLM: see issue 6)")
    hf = dict(spec_for_arch(cfg.model.arch).hf_config(cfg.model, "float32"))
    model_type = hf.pop("model_type")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf))
    return HFEngine(model, tok)


def _rows(prompt_ids, completions, seq: int, pad: int):
    """One row per response: prompt + response tokens, next-token labels, response mask."""
    n = len(completions)
    tokens = torch.full((n, seq + 1), pad, dtype=torch.long)
    mask = torch.zeros(n, seq)
    rollout_lp = torch.zeros(n, seq)
    for r, (p, c) in enumerate(zip(prompt_ids, completions)):
        ids = (list(p) + list(c.token_ids))[: seq + 1]
        tokens[r, : len(ids)] = torch.tensor(ids)
        start, end = len(p) - 1, len(ids) - 1  # label position t predicts token t + 1
        mask[r, start:end] = 1.0
        rollout_lp[r, start:end] = torch.tensor(c.logprobs[: end - start])
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": mask,
        "rollout_logprobs": rollout_lp,
    }


def _microbatches(rows: dict, idx: list[int], micro: int, ctx: ParallelContext, **extra) -> list[dict]:
    seq = rows["tokens"].shape[1]
    out = []
    for s in range(0, len(idx), micro):
        sel = torch.tensor(idx[s : s + micro])
        mb = {k: v[sel].to(ctx.device) for k, v in {**rows, **extra}.items()}
        mb["position_ids"] = torch.arange(seq, device=ctx.device).expand(len(sel), seq)
        mb["attention_mask"] = None
        out.append(mb)
    return out


def run_rl(cfg: Config) -> dict:
    """Train with T1's RL recipe; returns a summary of the last step."""
    t0 = time.perf_counter()
    ctx = init_parallel(cfg.parallel, seed=cfg.run.seed, device=cfg.run.device)
    cfg.validate(world_size=ctx.world_size)
    ro, seq = cfg.rollout, cfg.data.seq_length
    run_dir = cfg.run.run_dir
    if ctx.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    if not cfg.data.train_path:
        raise ConfigError(
            "data.train_path: an RL prompt set (jsonl/parquet with question + answer) is required"
        )
    prompts = load_prompts(cfg.data.train_path)
    if len(prompts) < ro.prompts_per_step:
        raise ConfigError(
            f"{cfg.data.train_path} has {len(prompts)} prompts, fewer than "
            f"rollout.prompts_per_step={ro.prompts_per_step}"
        )
    k = ro.keep or ro.n_samples
    rows_per_step = ro.prompts_per_step * k
    if rows_per_step % (cfg.data.micro_batch_size * ctx.dp):
        raise ConfigError(
            f"rollout.prompts_per_step x kept responses = {rows_per_step} is not divisible by "
            f"data.micro_batch_size x DP = {cfg.data.micro_batch_size} x {ctx.dp}"
        )
    tok = load_tokenizer(cfg)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    chunks = build_model(cfg)
    optimizer, scheduler = build_optimizer(cfg, chunks)
    ckpt_root = run_dir / "checkpoints"
    latest = latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
    if latest is None and cfg.checkpoint.init_from:
        load_checkpoint(resolve_init_from(cfg.checkpoint.init_from), cfg, chunks, weights_only=True)
    anchor = AnchorStore(chunks, cfg.anchor)  # = the starting policy
    start = 0
    if latest is not None:
        out = load_checkpoint(
            latest, cfg, chunks, optimizer, scheduler, extra_sharded={"anchor": anchor.sharded_state_dict()}
        )
        anchor.load_from(out["anchor"])
        start = out["step"]

    from megatron_t1.reward import RewardScorer
    from megatron_t1.rollout.engine import SamplingParams
    from megatron_t1.rollout.weight_sync import WeightSync

    engine = _make_engine(cfg, tok) if ctx.rank == 0 else None
    scorer = RewardScorer(cfg.reward) if ctx.rank == 0 else None
    sync = WeightSync(cfg)
    sync_res = sync(engine, chunks)
    logger = RunLogger(
        run_dir,
        enabled=ctx.is_logging_rank,
        total_steps=cfg.run.train_steps,
        start_step=start,
        tensorboard=cfg.log.tensorboard,
        progress_bar=cfg.log.progress_bar,
        desc="rl",
    )
    logger.info(
        f"rl: {len(prompts)} prompts, {ro.prompts_per_step} x K={ro.n_samples} per step (keep {k}); "
        f"TP={ctx.tp} PP={ctx.pp} DP={ctx.dp}; {'resuming at step ' + str(start) if start else 'from step 0'}"
    )
    lp_kw = dict(
        temperature=ro.temperature,
        vocab_size=cfg.model.vocab_size,
        seq_length=seq,
        micro_batch_size=cfg.data.micro_batch_size,
        chunk_size=cfg.loss.chunk_size,
    )
    scalars: dict[str, float] = {}
    for step in range(start, cfg.run.train_steps):
        times = {}
        # -- rollout ------------------------------------------------------------------------------
        t = time.perf_counter()
        items = step_prompts(prompts, step, ro.prompts_per_step, cfg.data.seed)
        gens = None
        if engine is not None:
            texts = [
                tok.apply_chat_template(
                    prompt_messages(it.question), tokenize=False, add_generation_prompt=True
                )
                for it in items
            ]
            params = SamplingParams.from_config(ro, seed=cfg.run.seed + step)
            gens = engine.generate(texts, ro.n_samples, params)
        gens = _broadcast(gens, ctx)
        times["rollout_s"] = time.perf_counter() - t
        # -- reward -------------------------------------------------------------------------------
        t = time.perf_counter()
        flat = [c for g in gens for c in g.completions]
        rewards = None
        if scorer is not None:
            golds = [it.answer for it in items for _ in range(ro.n_samples)]
            scored = scorer.score([c.text for c in flat], golds, truncated=[c.truncated for c in flat])
            rewards = torch.tensor(list(scored.rewards), dtype=torch.float32)
        rewards = _broadcast(rewards, ctx).view(ro.prompts_per_step, ro.n_samples)
        times["reward_s"] = time.perf_counter() - t
        # -- keep k of K ------------------------------------------------------------------------
        strategy = "all" if ro.keep is None else ro.selection
        sel = select_responses(rewards, k=k, strategy=strategy, seed=cfg.run.seed + step)
        if sel.prompt_idx.numel() * k != rows_per_step:
            logger.info(f"step {step + 1}: selection dropped prompts; training on what is left")
        keep = [(int(p), int(r)) for p, rs in zip(sel.prompt_idx, sel.response_idx) for r in rs]
        prompt_ids = [gens[p].prompt_token_ids for p, _ in keep]
        comps = [gens[p].completions[r] for p, r in keep]
        rows = _rows(prompt_ids, comps, seq, pad)
        kept_rewards = torch.stack([rewards[p, r] for p, r in keep]).view(-1, k)
        n_rows = len(keep)
        per_rank = n_rows // ctx.dp
        mine = list(range(ctx.dp_rank * per_rank, (ctx.dp_rank + 1) * per_rank))
        # -- policy and anchor log-probs (same shards, same rows) -> KL per response -------------
        t = time.perf_counter()
        mbs = _microbatches(rows, mine, cfg.data.micro_batch_size, ctx)
        pol = compute_logprobs(chunks, mbs, **lp_kw)
        with anchor.swapped_in():
            anc = compute_logprobs(chunks, mbs, **lp_kw)
        kl_local = torch.zeros(n_rows)
        if pol is not None:
            lp = torch.cat([m["logprobs"] for m in pol]).cpu()
            lpa = torch.cat([m["logprobs"] for m in anc]).cpu()
            msk = rows["loss_mask"][mine]
            per_tok = (lp - lpa) * msk
            kl_r = per_tok.sum(-1)
            if cfg.loss.kl_reduce == "mean":
                kl_r = kl_r / msk.sum(-1).clamp(min=1)
            kl_local[mine] = kl_r
        if ctx.world_size > 1:  # every rank needs every response's KL for the group baselines
            dist.all_reduce(kl_local)  # last-stage TP ranks each hold the same values
            kl_local /= ctx.tp
        kl = kl_local.view(-1, k)
        anchor_lp_rows = torch.zeros_like(rows["loss_mask"])
        if pol is not None:
            anchor_lp_rows[mine] = lpa
        times["logprob_s"] = time.perf_counter() - t
        # -- advantages -----------------------------------------------------------------------
        beta = cfg.loss.kl_coef if cfg.loss.kl_in == "reward" else 0.0
        adv = t1_advantages(kept_rewards, kl, beta=beta, config=cfg.loss).reshape(-1)
        # -- train ------------------------------------------------------------------------------
        t = time.perf_counter()
        G = int(rows["loss_mask"].sum())
        adv_rows = adv.view(-1, 1).expand(-1, seq).contiguous()
        extra = {"advantages": adv_rows}
        if cfg.loss.kl_in == "loss":
            extra["anchor_logprobs"] = anchor_lp_rows
        mbs = _microbatches(rows, mine, cfg.data.micro_batch_size, ctx, **extra)
        step_fn = partial(
            rl_forward_step,
            loss_config=cfg.loss,
            temperature=ro.temperature,
            vocab_size=cfg.model.vocab_size,
            global_num_tokens=G,
            global_num_seqs=n_rows,
        )
        res = train_step(
            chunks,
            optimizer,
            scheduler,
            step_fn,
            mbs,
            seq_length=seq,
            micro_batch_size=cfg.data.micro_batch_size,
        )
        times["train_s"] = time.perf_counter() - t
        done = step + 1
        # -- anchor ------------------------------------------------------------------------------
        action = anchor.update(done) if not res.skipped else "none"
        # -- weight sync -------------------------------------------------------------------------
        t = time.perf_counter()
        sync_res = sync(engine, chunks)
        times["sync_s"] = time.perf_counter() - t
        # -- checkpoint ------------------------------------------------------------------------
        last = done == cfg.run.train_steps
        exit_now = cfg.run.exit_interval is not None and done % cfg.run.exit_interval == 0 and not last
        if last or exit_now or (cfg.checkpoint.save_interval and done % cfg.checkpoint.save_interval == 0):
            save_checkpoint(
                ckpt_root,
                done,
                cfg,
                chunks,
                optimizer,
                scheduler,
                state={"kind": "rl"},
                extra_sharded={"anchor": anchor.sharded_state_dict()},
            )
        # -- log -----------------------------------------------------------------------------------
        lengths = torch.tensor([len(c.token_ids) for c in flat], dtype=torch.float32)
        scalars = {
            "loss": res.loss,
            "lr": res.lr,
            "grad_norm": res.grad_norm,
            "reward_mean": float(rewards.mean()),
            "accuracy": float((rewards > 0).float().mean()),
            "penalty_rate": float((rewards < 0).float().mean()),
            "response_len": float(lengths.mean()),
            "truncated_rate": float(sum(c.truncated for c in flat) / max(len(flat), 1)),
            "kl_anchor": float(kl.mean()),
            "adv_abs": float(adv.abs().mean()),
            "anchor_reset": 1.0 if action == "reset" else 0.0,
            **sync_res.metrics(),
            **{f"m/{k_}": v for k_, v in res.metrics.items()},
            **times,
        }
        logger.step(done, scalars, tokens=G)
        if exit_now:
            logger.info(f"exit_interval: stopping after step {done} (checkpoint saved; rerun to resume)")
            break
    if scorer is not None:
        scorer.close()
    if engine is not None:
        engine.close()
    logger.close()
    return {
        "run_dir": str(run_dir),
        **{k_: v for k_, v in scalars.items() if not k_.startswith("m/")},
        "wall_seconds": time.perf_counter() - t0,
    }
