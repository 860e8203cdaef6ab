"""T1 stage 2: RL with oversampling, rule-based rewards, an entropy bonus and a dynamic anchor.

``python -m megatron_t1 rl --config FILE [--set a.b=c ...]`` (torchrun for TP/PP/DP). One step, top to
bottom (arXiv 2501.11651 §3.2; ``../shared/T1.md``):

    rollout (K per prompt, tau) -> reward {1, 0, -1} -> keep k of K -> packed, DP-balanced
    micro-batches -> policy + anchor log-probs -> KL_i (k1), train/rollout mismatch
    -> A_i = s_i - mean_{j!=i} s_j, s_i = r_i - beta KL_i (x truncated IS weight, optional)
    -> train step (skipped if non-finite) -> anchor update -> weight sync (+ parity probe)
    -> held-out eval (every eval.eval_every) -> checkpoint -> log

Rollouts run on every rank (:mod:`megatron_t1.rollout.distributed`): the ranks form rollout groups of
``rollout.vllm_tensor_parallel_size`` inside a node, one engine each (``rollout.engine``: ``hf``,
transformers on the trainer's device; ``vllm``, in-process vLLM engines that sleep while the policy
trains on GPU, or ``vllm serve`` servers driven by rank 0); a step's prompts are dealt to the engines
by index, sampled with per-prompt seeds and gathered, so every rank holds the same responses (those one
engine would have drawn) and computes the same packing plan (:mod:`megatron_t1.data.rl_batch`); each
DP rank trains its share. Held-out evaluation is dealt the same way. A run resumes from its own
``latest`` checkpoint (policy, optimizer, anchor; the step number fixes the prompt order and the
sampling seeds); otherwise it starts from ``checkpoint.init_from`` with the anchor equal to the
starting policy. The last step saves a checkpoint and exports the policy as an HF folder
(``runs/NAME/hf``). With ``checkpoint.keep_best`` every held-out evaluation saves a checkpoint, the
best one by held-out accuracy is kept and marked (``checkpoints/best``; the evaluations are part of the
checkpoint's run state, so a resumed run selects over all of them) and exported as ``runs/NAME/hf_best``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_t1.config import Config, ConfigError, save_config
from megatron_t1.data.packing import schedule_shape
from megatron_t1.data.prompts import load_prompts, step_prompts
from megatron_t1.data.rl_batch import collate_rl_rank, plan_rl_packing, rl_documents
from megatron_t1.eval.heldout import problem_prompts
from megatron_t1.log import RunLogger
from megatron_t1.mcore.anchor_store import AnchorStore
from megatron_t1.mcore.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    resolve_init_from,
    save_checkpoint,
    step_dir_name,
)
from megatron_t1.mcore.model import build_model, packed_layout
from megatron_t1.mcore.parallel import ParallelContext, init_parallel
from megatron_t1.mcore.rl_forward import compute_logprobs, rl_forward_step
from megatron_t1.mcore.train_step import SkipGuard, build_optimizer, train_step
from megatron_t1.rl.advantage import t1_advantages
from megatron_t1.rl.oversample import select_responses
from megatron_t1.train.sft import load_tokenizer


def _per_doc_stats(pol, anc, mbs, n_docs: int, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """Per-response sum of log pi - log pi_anchor and token count; mismatch sum / count / max.

    Only the last pipeline stage has log-probs; its TP ranks hold identical copies. A SUM over all
    ranks divided by TP therefore gives every rank the global values (DP shares add up).
    """
    vec = torch.zeros(2 * n_docs + 2, dtype=torch.float64)
    worst = torch.zeros(1, dtype=torch.float64)
    if pol is not None:
        for mb, p, a in zip(mbs, pol, anc):
            m = mb["loss_mask"].cpu() > 0
            ids = mb["doc_ids"].cpu()[m]
            lp, lpa = p["logprobs"].cpu().double()[m], a["logprobs"].cpu().double()[m]
            vec[:n_docs].index_add_(0, ids, lp - lpa)
            vec[n_docs : 2 * n_docs].index_add_(0, ids, torch.ones_like(lp))
            diff = (lp - mb["rollout_logprobs"].cpu().double()[m]).abs()
            vec[-2] += diff.sum()
            vec[-1] += diff.numel()
            if diff.numel():
                worst = torch.maximum(worst, diff.max().view(1))
    if ctx.world_size > 1:
        dist.all_reduce(vec)
        vec /= ctx.tp
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {
        "kl_sum": vec[:n_docs].float(),
        "tokens": vec[n_docs : 2 * n_docs].float(),
        "mismatch_mean": float(vec[-2] / vec[-1].clamp(min=1)),
        "mismatch_max": float(worst),
    }


def export_hf(cfg: Config, ckpt_root: Path, out: Path) -> Path:
    """The converter's mcore -> HF of the newest checkpoint, plus the tokenizer files (atomic)."""
    from megatron_t1.convert.offline import mcore_to_hf

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    mcore_to_hf(ckpt_root, tmp, progress=False)
    if cfg.model.tokenizer:
        for f in Path(cfg.model.tokenizer).iterdir():
            if f.is_file() and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def best_step(evals: dict[int, float]) -> int | None:
    """The step with the highest held-out accuracy; a tie goes to the later step (more training)."""
    return max(evals, key=lambda step: (evals[step], step)) if evals else None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def _export_best(cfg: Config, ckpt_root: Path, best: int, last: int, hf_dir: Path, out: Path) -> None:
    """``hf_best/``: hard links to ``hf/`` when the last step is the best, else its own export."""
    if best == last:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(hf_dir, tmp, copy_function=_link_or_copy)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    else:
        export_hf(cfg, ckpt_root / step_dir_name(best), out)


def run_rl(cfg: Config) -> dict:
    """Train with T1's RL recipe; returns a summary of the last step."""
    t0 = time.perf_counter()
    ctx = init_parallel(cfg.parallel, seed=cfg.run.seed, device=cfg.run.device)
    cfg.validate(world_size=ctx.world_size)
    ro, seq, micro = cfg.rollout, cfg.data.seq_length, cfg.data.micro_batch_size
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
    heldout = load_prompts(cfg.eval.heldout_path)[: cfg.eval.heldout_size] if cfg.eval.heldout_path else []
    if cfg.eval.eval_every and not heldout:
        raise ConfigError("eval.eval_every is set but eval.heldout_path is not")
    if cfg.checkpoint.keep_best and not (heldout and cfg.eval.eval_every):
        raise ConfigError(
            "checkpoint.keep_best selects among held-out evaluations: it needs eval.heldout_path "
            "(a validation set) and eval.eval_every > 0"
        )
    k = ro.keep or ro.n_samples
    tok = load_tokenizer(cfg)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    chunks = build_model(cfg)
    layout = packed_layout(cfg)
    sched_seq, sched_micro = schedule_shape(layout, seq, micro)
    optimizer, scheduler = build_optimizer(cfg, chunks)
    ckpt_root = run_dir / "checkpoints"
    latest = latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
    if latest is None and cfg.checkpoint.init_from:
        load_checkpoint(resolve_init_from(cfg.checkpoint.init_from), cfg, chunks, weights_only=True)
    anchor = AnchorStore(chunks, cfg.anchor)  # = the starting policy
    start = 0
    evals: dict[int, float] = {}  # step -> held-out accuracy of the saved checkpoints (keep_best)
    if latest is not None:
        out = load_checkpoint(
            latest, cfg, chunks, optimizer, scheduler, extra_sharded={"anchor": anchor.sharded_state_dict()}
        )
        anchor.load_from(out["anchor"])
        start = out["step"]
        evals = {int(k_): float(v) for k_, v in out["state"].get("evals", {}).items()}

    from megatron_t1.reward import RewardScorer
    from megatron_t1.rollout.distributed import DistributedRollout
    from megatron_t1.rollout.engine import SamplingParams, sample_seed
    from megatron_t1.rollout.weight_sync import WeightSync

    rollout = DistributedRollout.build(
        cfg, tok, rank=ctx.rank, world_size=ctx.world_size, ranks_per_node=ctx.local_world_size,
        device=ctx.device, run_dir=run_dir,
    )  # fmt: skip
    scorer = RewardScorer(cfg.reward) if ctx.rank == 0 else None
    sync = WeightSync(cfg)
    sync_res = rollout.sync(sync, chunks)
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
        f"TP={ctx.tp} PP={ctx.pp} DP={ctx.dp}; {rollout.placement.describe()}; "
        f"{'resuming at step ' + str(start) if start else 'from step 0'}"
    )
    lp_kw = dict(
        temperature=ro.temperature,
        vocab_size=cfg.model.vocab_size,
        seq_length=sched_seq,
        micro_batch_size=sched_micro,
        chunk_size=cfg.loss.chunk_size,
        fused_output_layer=cfg.loss.fused_output_layer,
    )
    scalars: dict[str, float] = {}
    guard = SkipGuard(cfg.run.max_skipped_steps)
    if heldout and cfg.eval.eval_every and cfg.eval.eval_at_start and start == 0:  # the curve's step 0
        t = time.perf_counter()
        ev0 = rollout.evaluate(heldout, cfg, tok)
        logger.step(0, {**ev0, "eval_s": time.perf_counter() - t}, advance=False)
    for step in range(start, cfg.run.train_steps):
        times = {}
        # -- rollout ------------------------------------------------------------------------------
        t = time.perf_counter()
        items = step_prompts(prompts, step, ro.prompts_per_step, cfg.data.seed)
        texts = problem_prompts(tok, items)
        seeds = [sample_seed(cfg.run.seed, step, i) for i in range(len(items))]
        gens = rollout.generate(texts, ro.n_samples, SamplingParams.from_config(ro), seeds=seeds)
        rollout.sleep()  # colocated vLLM on GPU: free its memory for training
        times["rollout_s"] = time.perf_counter() - t
        # -- reward -------------------------------------------------------------------------------
        t = time.perf_counter()
        flat = [c for g in gens for c in g.completions]
        rewards = None
        if scorer is not None:
            golds = [it.answer for it in items for _ in range(ro.n_samples)]
            scored = scorer.score([c.text for c in flat], golds, truncated=[c.truncated for c in flat])
            rewards = torch.tensor(list(scored.rewards), dtype=torch.float32)
        rewards = rollout.broadcast(rewards).view(ro.prompts_per_step, ro.n_samples)
        times["reward_s"] = time.perf_counter() - t
        # -- keep k of K, pack into DP-balanced micro-batches ----------------------------------------
        strategy = "all" if ro.keep is None else ro.selection
        sel = select_responses(rewards, k=k, strategy=strategy, seed=cfg.run.seed + step)
        keep = [(int(p), int(r)) for p, rs in zip(sel.prompt_idx, sel.response_idx) for r in rs]
        comps = [gens[p].completions[r] for p, r in keep]
        docs, plens, _ = rl_documents(
            [gens[p].prompt_token_ids for p, _ in keep], [c.token_ids for c in comps], seq
        )
        kept_rewards = torch.stack([rewards[p, r] for p, r in keep]).view(-1, k)
        n_docs = len(docs)
        # optim_steps_per_batch > 1: the step's prompt groups split into that many mini-batches, one
        # optimizer step each (PPO-style, clipped ratio against the log-probs taken before the first)
        n_mini = min(cfg.loss.optim_steps_per_batch, n_docs // k)
        groups = [list(range(g * k, (g + 1) * k)) for g in range(n_docs // k)]
        parts = [sum(groups[j::n_mini], []) for j in range(n_mini)]
        part_mbs, plans = [], []
        for part in parts:
            plan = plan_rl_packing([len(docs[d]) for d in part], seq, ctx.dp, micro)
            mbs = collate_rl_rank(
                plan,
                ctx.dp_rank,
                [docs[d] for d in part],
                [plens[d] for d in part],
                pad,
                {"rollout_logprobs": [comps[d].logprobs for d in part]},
                doc_index=part,
                layout=layout,
            )
            part_mbs.append(mbs)  # on the CPU: each moves to the device when the schedule takes it
            plans.append(plan)
        all_mbs = [mb for mbs in part_mbs for mb in mbs]
        # -- policy and anchor log-probs (same shards, same micro-batches) -> KL_i, mismatch -----------
        t = time.perf_counter()
        pol = compute_logprobs(chunks, all_mbs, **lp_kw)
        with anchor.swapped_in():
            anc = compute_logprobs(chunks, all_mbs, **lp_kw)
        st = _per_doc_stats(pol, anc, all_mbs, n_docs, ctx)
        kl = st["kl_sum"] / (st["tokens"].clamp(min=1) if cfg.loss.kl_reduce == "mean" else 1.0)
        times["logprob_s"] = time.perf_counter() - t
        # -- advantages -------------------------------------------------------------------------------
        beta = cfg.loss.kl_coef if cfg.loss.kl_in == "reward" else 0.0
        adv = t1_advantages(kept_rewards, kl.view(-1, k), beta=beta, config=cfg.loss).reshape(-1)
        tis_sum = tis_clip = 0.0
        for i, mb in enumerate(all_mbs):
            a = adv[mb["doc_ids"].clamp(min=0)] * mb["loss_mask"]
            if pol is not None:
                mb["anchor_logprobs"] = anc[i]["logprobs"].cpu()
                if n_mini > 1:
                    mb["old_logprobs"] = pol[i]["logprobs"].cpu()
                if cfg.loss.tis_cap is not None:
                    w = torch.exp(pol[i]["logprobs"].cpu() - mb["rollout_logprobs"])
                    m = mb["loss_mask"]
                    tis_clip += float(((w > cfg.loss.tis_cap).float() * m).sum())
                    w = w.clamp(max=cfg.loss.tis_cap)
                    tis_sum += float((w * m).sum())
                    a = a * w
            mb["advantages"] = a
        del pol, anc  # on GPU the passes' outputs; the micro-batches hold CPU copies of what they need
        # -- train: one optimizer step per mini-batch, the anchor follows every step -----------------------
        t = time.perf_counter()
        done = step + 1
        G = sum(len(d) - p for d, p in zip(docs, plens))
        results, action, skipped = [], "none", False
        for j, (part, mbs) in enumerate(zip(parts, part_mbs)):
            step_fn = partial(
                rl_forward_step,
                loss_config=cfg.loss,
                temperature=ro.temperature,
                vocab_size=cfg.model.vocab_size,
                global_num_tokens=sum(len(docs[d]) - plens[d] for d in part),
                global_num_seqs=len(part),
            )
            res = train_step(
                chunks, optimizer, scheduler, step_fn, mbs, seq_length=sched_seq, micro_batch_size=sched_micro
            )
            bad = res.skipped or not math.isfinite(res.loss)
            skipped = skipped or bad
            if bad:
                logger.info(
                    f"step {done} (optimizer step {j + 1} of {n_mini}): non-finite loss or gradient "
                    f"(loss {res.loss}, grad norm {res.grad_norm}); update skipped"
                )
            else:
                a_ = anchor.update(step * n_mini + j + 1)
                action = "reset" if a_ == "reset" else action
            results.append(res)
        guard.update(skipped, done)
        times["train_s"] = time.perf_counter() - t
        res = results[-1]
        res_loss = sum(r.loss for r in results) / len(results)
        res_gn = sum(r.grad_norm for r in results) / len(results)
        res_metrics = {
            key: sum(r.metrics.get(key, 0.0) for r in results) / len(results) for key in res.metrics
        }
        plan_stats = {key: sum(p.stats()[key] for p in plans) / len(plans) for key in plans[0].stats()}
        # -- weight sync -------------------------------------------------------------------------
        t = time.perf_counter()
        sync_res = rollout.sync(sync, chunks)
        times["sync_s"] = time.perf_counter() - t
        # -- held-out eval -------------------------------------------------------------------------
        last = done == cfg.run.train_steps
        ev = {}
        if heldout and (last or (cfg.eval.eval_every and done % cfg.eval.eval_every == 0)):
            t = time.perf_counter()
            ev = rollout.evaluate(heldout, cfg, tok)
            times["eval_s"] = time.perf_counter() - t
        best = None
        if cfg.checkpoint.keep_best:
            if ev:
                evals[done] = ev["heldout_accuracy"]
            best = best_step(evals)
            if best is not None:
                ev |= {"heldout_best_step": float(best), "heldout_best_accuracy": evals[best]}
        # -- checkpoint ------------------------------------------------------------------------
        exit_now = cfg.run.exit_interval is not None and done % cfg.run.exit_interval == 0 and not last
        periodic = cfg.checkpoint.save_interval and done % cfg.checkpoint.save_interval == 0
        if last or exit_now or periodic or (cfg.checkpoint.keep_best and done in evals):
            t = time.perf_counter()
            save_checkpoint(
                ckpt_root,
                done,
                cfg,
                chunks,
                optimizer,
                scheduler,
                state={"kind": "rl", "evals": dict(evals)},
                extra_sharded={"anchor": anchor.sharded_state_dict()},
                best=best,
            )
            times["ckpt_s"] = time.perf_counter() - t
        # -- log -----------------------------------------------------------------------------------
        lengths = torch.tensor([len(c.token_ids) for c in flat], dtype=torch.float32)
        n_tok = max(G, 1)
        scalars = {
            "loss": res_loss,
            "lr": res.lr,
            "grad_norm": res_gn,
            "skipped": float(skipped),
            "reward_mean": float(rewards.mean()),
            "accuracy": float((rewards > 0).float().mean()),
            "penalty_rate": float((rewards < 0).float().mean()),
            "response_len": float(lengths.mean()),
            "truncated_rate": float(sum(c.truncated for c in flat) / max(len(flat), 1)),
            "kl_anchor": float(kl.mean()),
            "adv_mean": float(adv.mean()),
            "adv_abs": float(adv.abs().mean()),
            "adv_std": float(adv.std()) if adv.numel() > 1 else 0.0,
            "anchor_reset": 1.0 if action == "reset" else 0.0,
            "mismatch_mean": st["mismatch_mean"],
            "mismatch_max": st["mismatch_max"],
            **plan_stats,
            **rollout.stats,
            **sync_res.metrics(),
            **{f"m/{k_}": v for k_, v in res_metrics.items()},
            **ev,
            **times,
        }
        if cfg.loss.tis_cap is not None:
            scalars |= {"tis_weight": tis_sum / n_tok, "tis_clip_frac": tis_clip / n_tok}
        logger.step(done, scalars, tokens=G)
        if exit_now:
            logger.info(f"exit_interval: stopping after step {done} (checkpoint saved; rerun to resume)")
            break
    if scorer is not None:
        scorer.close()
    hf_dir = best_dir = None
    best = best_step(evals) if cfg.checkpoint.keep_best else None
    if start < cfg.run.train_steps and scalars and not (cfg.run.exit_interval and done < cfg.run.train_steps):
        if ctx.world_size > 1:
            dist.barrier()
        hf_dir = run_dir / "hf"
        if ctx.rank == 0:
            export_hf(cfg, ckpt_root, hf_dir)
            logger.info(f"final policy exported as an HF folder: {hf_dir}")
        if best is not None:
            best_dir = run_dir / "hf_best"
            if ctx.rank == 0:
                _export_best(cfg, ckpt_root, best, done, hf_dir, best_dir)
                logger.info(
                    f"best held-out accuracy {evals[best]:.4f} at step {best} (of steps {sorted(evals)}); "
                    f"exported as {best_dir}"
                )
    logger.close()
    # Last: closing an external-launcher vLLM engine tears down torch.distributed (vLLM's own cleanup).
    rollout.close()
    return {
        "run_dir": str(run_dir),
        "hf_dir": str(hf_dir) if hf_dir else None,
        "best_hf_dir": str(best_dir) if best_dir else None,
        "best_step": best,
        "evals": dict(sorted(evals.items())),
        **{k_: v for k_, v in scalars.items() if not k_.startswith("m/")},
        "wall_seconds": time.perf_counter() - t0,
    }
