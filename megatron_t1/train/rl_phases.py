"""The phases of one T1 RL step, each a function of the run's state (:class:`RLRun`) and the phases
before it. :func:`megatron_t1.train.rl.run_rl` calls them in order; the math is in :mod:`megatron_t1.rl`
(pure functions), the packing in :mod:`megatron_t1.data.rl_batch`, the model passes in
:mod:`megatron_t1.mcore`. What a phase computes on one rank it reduces over ranks itself, so every
value it returns is the same on every rank unless its docstring says otherwise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_t1.config import Config, ConfigError, save_config
from megatron_t1.data.packing import schedule_shape
from megatron_t1.data.prompts import PromptItem, load_prompts, step_prompts
from megatron_t1.data.rl_batch import StepBatches, pack_step, rl_documents
from megatron_t1.eval.heldout import problem_prompts
from megatron_t1.log import RunLogger
from megatron_t1.mcore.anchor_store import AnchorStore
from megatron_t1.mcore.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    resolve_init_from,
    save_checkpoint,
)
from megatron_t1.mcore.model import build_model, packed_layout
from megatron_t1.mcore.moe import RouteAgreement
from megatron_t1.mcore.parallel import ParallelContext, init_parallel
from megatron_t1.mcore.rl_forward import compute_logprobs, rl_forward_step
from megatron_t1.mcore.train_step import SkipGuard, StepResult, build_optimizer, train_step
from megatron_t1.reward import DETECTORS, RewardScorer
from megatron_t1.rl.advantage import t1_advantages, token_advantages
from megatron_t1.rl.kl import finish_response_kl, response_kl_parts
from megatron_t1.rl.mismatch import logprob_mismatch, truncated_is_weights
from megatron_t1.rl.oversample import select_responses
from megatron_t1.rollout.distributed import DistributedRollout
from megatron_t1.rollout.engine import PromptCompletions, SamplingParams, sample_seed
from megatron_t1.rollout.weight_sync import WeightSync
from megatron_t1.train.sft import load_tokenizer


class PhaseTimes(dict):
    """Seconds per phase of one step (``rollout_s``, ...): :meth:`lap` records the time since the last
    lap or :meth:`restart`."""

    def __init__(self) -> None:
        super().__init__()
        self._t = time.perf_counter()

    def restart(self) -> None:
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self[name], self._t = now - self._t, now


@dataclass
class RLRun:
    """Everything the phases share, built once by :func:`setup`."""

    cfg: Config
    ctx: ParallelContext
    tokenizer: Any
    pad_id: int
    prompts: list[PromptItem]
    heldout: list[PromptItem]
    chunks: list
    optimizer: Any
    scheduler: Any
    anchor: AnchorStore
    rollout: DistributedRollout
    scorer: RewardScorer | None
    """Rank 0 only (the rewards are broadcast)."""
    sync: WeightSync
    logger: RunLogger
    layout: str
    """``thd`` or ``mask`` (:func:`megatron_t1.mcore.model.packed_layout`)."""
    schedule: tuple[int, int]
    """(seq_length, micro_batch_size) as Megatron's schedule sees a micro-batch of that layout."""
    start: int
    """The first step to run (0, or the resumed checkpoint's step)."""
    evals: dict[int, float] = field(default_factory=dict)
    """step -> held-out accuracy of the saved checkpoints (``checkpoint.keep_best``)."""
    guard: SkipGuard | None = None

    @property
    def keep(self) -> int:
        """k: responses kept per prompt."""
        return self.cfg.rollout.keep or self.cfg.rollout.n_samples

    @property
    def ckpt_root(self) -> Path:
        return self.cfg.run.run_dir / "checkpoints"

    def logprob_kwargs(self) -> dict:
        cfg = self.cfg
        return dict(
            temperature=cfg.rollout.temperature,
            vocab_size=cfg.model.vocab_size,
            seq_length=self.schedule[0],
            micro_batch_size=self.schedule[1],
            chunk_size=cfg.loss.chunk_size,
            fused_output_layer=cfg.loss.fused_output_layer,
            routing_replay=cfg.loss.routing_replay,
        )


def setup(cfg: Config) -> RLRun:
    """Process groups, the config check and its copy in the run folder, the prompt and held-out sets,
    the model and optimizer (resumed from the run's own ``latest``, else ``checkpoint.init_from``),
    the anchor (= the starting policy unless resumed), the rollout engines (synced once), the reward
    scorer and the logger."""
    ctx = init_parallel(cfg.parallel, seed=cfg.run.seed, device=cfg.run.device)
    cfg.validate(world_size=ctx.world_size, stage="rl")
    ro, run_dir = cfg.rollout, cfg.run.run_dir
    if ctx.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    prompts = load_prompts(cfg.data.train_path)
    if len(prompts) < ro.prompts_per_step:
        raise ConfigError(
            f"{cfg.data.train_path} has {len(prompts)} prompts, fewer than "
            f"rollout.prompts_per_step={ro.prompts_per_step}"
        )
    heldout = load_prompts(cfg.eval.heldout_path)[: cfg.eval.heldout_size] if cfg.eval.heldout_path else []
    tok = load_tokenizer(cfg)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    chunks = build_model(cfg)
    layout = packed_layout(cfg)
    optimizer, scheduler = build_optimizer(cfg, chunks)
    ckpt_root = run_dir / "checkpoints"
    latest = latest_checkpoint(ckpt_root) if cfg.checkpoint.resume else None
    if latest is None and cfg.checkpoint.init_from:
        load_checkpoint(resolve_init_from(cfg.checkpoint.init_from), cfg, chunks, weights_only=True)
    anchor = AnchorStore(chunks, cfg.anchor)  # = the starting policy
    start, evals = 0, {}
    if latest is not None:
        out = load_checkpoint(
            latest, cfg, chunks, optimizer, scheduler, extra_sharded={"anchor": anchor.sharded_state_dict()}
        )
        anchor.load_from(out["anchor"])
        start = out["step"]
        evals = {int(s): float(v) for s, v in out["state"].get("evals", {}).items()}

    rollout = DistributedRollout.build(
        cfg, tok, rank=ctx.rank, world_size=ctx.world_size, ranks_per_node=ctx.local_world_size,
        device=ctx.device, run_dir=run_dir,
    )  # fmt: skip
    scorer = RewardScorer(cfg.reward) if ctx.rank == 0 else None
    sync = WeightSync(cfg)
    rollout.sync(sync, chunks)
    logger = RunLogger.for_run(cfg, enabled=ctx.is_logging_rank, start_step=start, desc="rl")
    run = RLRun(
        cfg, ctx, tok, pad, prompts, heldout, chunks, optimizer, scheduler, anchor, rollout, scorer, sync,
        logger, layout, schedule_shape(layout, cfg.data.seq_length, cfg.data.micro_batch_size), start,
        evals, SkipGuard(cfg.run.max_skipped_steps),
    )  # fmt: skip
    logger.info(
        f"rl: {len(prompts)} prompts, {ro.prompts_per_step} x K={ro.n_samples} per step (keep {run.keep}); "
        f"TP={ctx.tp} PP={ctx.pp} DP={ctx.dp}; {rollout.placement.describe()}; "
        f"{'resuming at step ' + str(start) if start else 'from step 0'}"
    )
    return run


# --------------------------------------------------------------------------------------------------
# rollout -> score -> select -> pack
# --------------------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    """A step's prompts and their K sampled responses each."""

    items: list[PromptItem]
    gens: list[PromptCompletions]
    detector_rates: dict[str, float] = field(default_factory=dict)
    """Share of the responses each -1 detector fired on (``overlong``, ``repetition``, ``garbage``), set
    by :func:`score_phase` whether or not ``reward.penalty`` punishes them (its ablation sets it to 0)."""

    def completions(self) -> list:
        return [c for g in self.gens for c in g.completions]


def rollout_phase(run: RLRun, step: int) -> Rollouts:
    """The step's prompts (a pure function of data.seed and the step) sampled K times each, with
    per-prompt seeds, on every rollout engine; then the engines sleep (colocated vLLM frees its memory
    for training)."""
    cfg = run.cfg
    items = step_prompts(run.prompts, step, cfg.rollout.prompts_per_step, cfg.data.seed)
    texts = problem_prompts(
        run.tokenizer, items, template=cfg.data.prompt_template, system=cfg.data.system_prompt
    )
    seeds = [sample_seed(cfg.run.seed, step, i) for i in range(len(items))]
    params = SamplingParams.from_config(cfg.rollout)
    gens = run.rollout.generate(texts, cfg.rollout.n_samples, params, seeds=seeds)
    run.rollout.sleep()
    return Rollouts(items, gens)


def score_phase(run: RLRun, ro: Rollouts) -> torch.Tensor:
    """T1's rule-based rewards {1, 0, -1} on rank 0, broadcast: [prompts, K] float32."""
    K = run.cfg.rollout.n_samples
    flat = ro.completions()
    out = None
    if run.scorer is not None:
        golds = [it.answer for it in ro.items for _ in range(K)]
        scored = run.scorer.score([c.text for c in flat], golds, truncated=[c.truncated for c in flat])
        rates = {d: scored.metrics.get(f"reward/penalty/{d}", 0.0) for d in DETECTORS}
        out = (torch.tensor(list(scored.rewards), dtype=torch.float32), rates)
    rewards, ro.detector_rates = run.rollout.broadcast(out)
    return rewards.view(len(ro.items), K)


@dataclass
class Selected:
    """The k of K responses kept per prompt: (prompt, response) index pairs, prompt by prompt."""

    pairs: list[tuple[int, int]]
    rewards: torch.Tensor
    """[prompts, k] their rewards."""


def select_phase(run: RLRun, rewards: torch.Tensor, step: int) -> Selected:
    """Keep k of K per prompt (``rollout.selection``; all of them without ``rollout.keep``)."""
    ro, k = run.cfg.rollout, run.keep
    strategy = "all" if ro.keep is None else ro.selection
    sel = select_responses(rewards, k=k, strategy=strategy, seed=run.cfg.run.seed + step)
    pairs = [(int(p), int(r)) for p, rs in zip(sel.prompt_idx, sel.response_idx) for r in rs]
    return Selected(pairs, torch.stack([rewards[p, r] for p, r in pairs]).view(-1, k))


def pack_phase(run: RLRun, ro: Rollouts, sel: Selected) -> StepBatches:
    """Prompt + response documents, split into ``loss.optim_steps_per_batch`` mini-batches of whole
    prompt groups, packed into DP-balanced micro-batches (this rank's, on the CPU), each carrying the
    rollout engine's log-probs."""
    cfg = run.cfg
    comps = [ro.gens[p].completions[r] for p, r in sel.pairs]
    docs, plens, _ = rl_documents(
        [ro.gens[p].prompt_token_ids for p, _ in sel.pairs], [c.token_ids for c in comps], cfg.data.seq_length
    )
    routes = None
    if cfg.records_routing:  # prompt + response routing, cut like the document
        routes = [
            torch.cat([ro.gens[p].routed_experts, c.routed_experts])[: len(d)]
            for (p, _), c, d in zip(sel.pairs, comps, docs)
        ]
    return pack_step(
        docs,
        plens,
        {"rollout_logprobs": [c.logprobs for c in comps]},
        k=run.keep,
        optim_steps=cfg.loss.optim_steps_per_batch,
        seq_len=cfg.data.seq_length,
        dp=run.ctx.dp,
        dp_rank=run.ctx.dp_rank,
        micro_batch_size=cfg.data.micro_batch_size,
        pad_id=run.pad_id,
        layout=run.layout,
        doc_routes=routes,
    )


# --------------------------------------------------------------------------------------------------
# log-probs -> advantages
# --------------------------------------------------------------------------------------------------


@dataclass
class Passes:
    """The policy's and the anchor's log-prob passes over the step's micro-batches (last pipeline stage
    only, else None; on the trainer's device), and what they give every rank: KL_i and the mismatch."""

    policy: list[dict] | None
    anchor: list[dict] | None
    kl: torch.Tensor
    """[documents] KL_i to the anchor (``loss.kl_reduce``), float32."""
    mismatch_mean: float
    mismatch_max: float
    route: dict[str, float] = field(default_factory=dict)
    """``moe/route_agreement`` of the policy pass (``Config.records_routing``), else empty."""


def logprob_phase(run: RLRun, batch: StepBatches) -> Passes:
    """Policy and anchor log-probs (same shards, same micro-batches; the anchor swapped in), then the
    per-response k1 sums and the train/rollout mismatch reduced over all ranks."""
    mbs, kw = batch.all_microbatches(), run.logprob_kwargs()
    agreement = RouteAgreement() if run.cfg.records_routing else None
    pol = compute_logprobs(run.chunks, mbs, route_agreement=agreement, **kw)
    with run.anchor.swapped_in():
        anc = compute_logprobs(run.chunks, mbs, **kw)
    n = batch.num_docs
    vec = torch.zeros(2 * n + 2, dtype=torch.float64)  # kl sums | token counts | |diff| sum, count
    worst = torch.zeros(1, dtype=torch.float64)
    if pol is not None:
        for mb, p, a in zip(mbs, pol, anc):
            lp, mask = p["logprobs"].cpu(), mb["loss_mask"].cpu()
            parts = response_kl_parts(lp, a["logprobs"].cpu(), mask, mb["doc_ids"].cpu(), n)
            vec[:n] += parts.kl_sum
            vec[n : 2 * n] += parts.tokens
            mis = logprob_mismatch(lp, mb["rollout_logprobs"].cpu(), mask)
            vec[-2] += mis.abs_sum
            vec[-1] += mis.count
            worst = torch.maximum(worst, mis.max.view(1))
    ctx = run.ctx
    if ctx.world_size > 1:
        # Only the last pipeline stage has log-probs and its TP ranks hold identical copies: a SUM
        # over all ranks divided by TP gives every rank the global values (DP shares add up).
        dist.all_reduce(vec)
        vec /= ctx.tp
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    kl = finish_response_kl(vec[:n].float(), vec[n : 2 * n].float(), run.cfg.loss.kl_reduce)
    # Every rank routes its own tokens in its own layers: a sum over all ranks counts each (token,
    # layer) once per TP rank without sequence parallelism, which leaves the share unchanged.
    route = agreement.metrics(group=None if ctx.world_size == 1 else dist.group.WORLD) if agreement else {}
    return Passes(pol, anc, kl, float(vec[-2] / vec[-1].clamp(min=1)), float(worst), route)


@dataclass
class Advantages:
    """Per-response A_i (flattened [prompts * k], the same on every rank) and, with ``loss.tis_cap``,
    this rank's truncated-IS statistics (sums over its response tokens)."""

    values: torch.Tensor
    tis_weight_sum: float = 0.0
    tis_clipped: float = 0.0


def advantage_phase(run: RLRun, batch: StepBatches, sel: Selected, passes: Passes) -> Advantages:
    """A_i = s_i - mean_{j != i} s_j with s_i = r_i - beta KL_i (``loss.kl_in: reward``), written into
    every micro-batch as per-token ``advantages`` (times the truncated IS weight with ``loss.tis_cap``),
    with the ``anchor_logprobs`` the loss needs and, for several optimizer steps per batch, the
    ``old_logprobs`` of the clipped ratio. Everything attached is a CPU copy."""
    loss = run.cfg.loss
    beta = loss.kl_coef if loss.kl_in == "reward" else 0.0
    adv = t1_advantages(sel.rewards, passes.kl.view(-1, run.keep), beta=beta, config=loss).reshape(-1)
    out = Advantages(adv)
    for i, mb in enumerate(batch.all_microbatches()):
        a = token_advantages(adv, mb["doc_ids"], mb["loss_mask"])
        if passes.policy is not None:
            lp = passes.policy[i]["logprobs"].cpu()
            mb["anchor_logprobs"] = passes.anchor[i]["logprobs"].cpu()
            if batch.num_minibatches > 1:
                mb["old_logprobs"] = lp
            if loss.tis_cap is not None:
                tis = truncated_is_weights(lp, mb["rollout_logprobs"], mb["loss_mask"], cap=loss.tis_cap)
                out.tis_clipped += float(tis.clipped)
                out.tis_weight_sum += float(tis.weight_sum)
                a = a * tis.weights
        mb["advantages"] = a
    return out


# --------------------------------------------------------------------------------------------------
# update -> anchor
# --------------------------------------------------------------------------------------------------


def update_phase(run: RLRun, batch: StepBatches, j: int, step: int) -> StepResult:
    """One optimizer step on mini-batch ``j`` (T1's loss, normalised by the mini-batch's global token
    and response counts); a non-finite loss or gradient skips it (``StepResult.skipped``)."""
    cfg, part = run.cfg, batch.parts[j]
    step_fn = partial(
        rl_forward_step,
        loss_config=cfg.loss,
        temperature=cfg.rollout.temperature,
        vocab_size=cfg.model.vocab_size,
        global_num_tokens=batch.response_tokens(part),
        global_num_seqs=len(part),
    )
    seq, micro = run.schedule
    res = train_step(
        run.chunks, run.optimizer, run.scheduler, step_fn, batch.microbatches[j], seq_length=seq,
        micro_batch_size=micro,
    )  # fmt: skip
    if res.skipped or not math.isfinite(res.loss):
        res.skipped = True
        run.logger.info(
            f"step {step + 1} (optimizer step {j + 1} of {batch.num_minibatches}): non-finite loss or "
            f"gradient (loss {res.loss}, grad norm {res.grad_norm}); update skipped"
        )
    return res


def anchor_phase(run: RLRun, res: StepResult, optimizer_step: int) -> str:
    """The dynamic anchor follows every optimizer step that was not skipped: "ema", "reset" or "none"."""
    return "none" if res.skipped else run.anchor.update(optimizer_step)


@dataclass
class Update:
    """The step's optimizer steps, summarised (means over the mini-batches)."""

    results: list[StepResult]
    anchor_actions: list[str]

    @property
    def skipped(self) -> bool:
        return any(r.skipped for r in self.results)

    def scalars(self) -> dict[str, float]:
        rs = self.results
        return {
            "loss": sum(r.loss for r in rs) / len(rs),
            "lr": rs[-1].lr,
            "grad_norm": sum(r.grad_norm for r in rs) / len(rs),
            "skipped": float(self.skipped),
            "anchor_reset": 1.0 if "reset" in self.anchor_actions else 0.0,
            **{f"m/{key}": sum(r.metrics.get(key, 0.0) for r in rs) / len(rs) for key in rs[-1].metrics},
            **{key: sum(r.moe.get(key, 0.0) for r in rs) / len(rs) for key in rs[-1].moe},
        }


# --------------------------------------------------------------------------------------------------
# eval -> checkpoint -> log
# --------------------------------------------------------------------------------------------------


def is_last(run: RLRun, done: int) -> bool:
    return done == run.cfg.run.train_steps


def exits_after(run: RLRun, done: int) -> bool:
    """``run.exit_interval``: stop after this step (a checkpoint is saved; a rerun resumes)."""
    every = run.cfg.run.exit_interval
    return every is not None and done % every == 0 and not is_last(run, done)


def best_step(evals: dict[int, float]) -> int | None:
    """The step with the highest held-out accuracy; a tie goes to the later step (more training)."""
    return max(evals, key=lambda step: (evals[step], step)) if evals else None


def heldout_eval(run: RLRun) -> dict[str, float]:
    """``cfg.eval``'s held-out accuracy of the synced engines; with ``eval.sampled_size``, also
    ``heldout_sampled_accuracy`` (+ stderr, length) of one sample per problem at the rollout temperature."""
    cfg = run.cfg
    res = run.rollout.evaluate(run.heldout, cfg, run.tokenizer)
    if cfg.eval.sampled_size:
        at_t = replace(cfg, eval=replace(cfg.eval, temperature=cfg.rollout.temperature, n_samples=1))
        sampled = run.rollout.evaluate(run.heldout[: cfg.eval.sampled_size], at_t, run.tokenizer)
        res |= {k.replace("heldout_", "heldout_sampled_"): v for k, v in sampled.items()}
    return res


def initial_eval_phase(run: RLRun) -> None:
    """With ``eval.eval_every`` and ``eval.eval_at_start``, a fresh run first evaluates (and logs as
    step 0) the starting policy."""
    ev = run.cfg.eval
    if run.heldout and ev.eval_every and ev.eval_at_start and run.start == 0:
        t = time.perf_counter()
        res = heldout_eval(run)
        run.logger.step(0, {**res, "eval_s": time.perf_counter() - t}, advance=False)


def eval_phase(run: RLRun, done: int, times: dict[str, float]) -> dict[str, float]:
    """Held-out accuracy of the synced engines after step ``done`` (every ``eval.eval_every`` steps and
    at the last), recorded for ``checkpoint.keep_best``; {} when not evaluated. Adds ``eval_s``."""
    cfg, ev = run.cfg, {}
    if run.heldout and (is_last(run, done) or (cfg.eval.eval_every and done % cfg.eval.eval_every == 0)):
        t = time.perf_counter()
        ev = heldout_eval(run)
        times["eval_s"] = time.perf_counter() - t
    if cfg.checkpoint.keep_best:
        if ev:
            run.evals[done] = ev["heldout_accuracy"]
        best = best_step(run.evals)
        if best is not None:
            ev |= {"heldout_best_step": float(best), "heldout_best_accuracy": run.evals[best]}
    return ev


def checkpoint_phase(run: RLRun, done: int, times: dict[str, float]) -> None:
    """Save policy, optimizer and anchor after step ``done`` when due: the last step, before an
    ``exit_interval`` stop, every ``checkpoint.save_interval``, and after each evaluation under
    ``keep_best`` (the best one is marked and never pruned). Adds ``ckpt_s``."""
    cfg = run.cfg
    periodic = cfg.checkpoint.save_interval and done % cfg.checkpoint.save_interval == 0
    evaluated = cfg.checkpoint.keep_best and done in run.evals
    if not (is_last(run, done) or exits_after(run, done) or periodic or evaluated):
        return
    t = time.perf_counter()
    save_checkpoint(
        run.ckpt_root,
        done,
        cfg,
        run.chunks,
        run.optimizer,
        run.scheduler,
        state={"kind": "rl", "evals": dict(run.evals)},
        extra_sharded={"anchor": run.anchor.sharded_state_dict()},
        best=best_step(run.evals) if cfg.checkpoint.keep_best else None,
    )
    times["ckpt_s"] = time.perf_counter() - t


def log_phase(
    run: RLRun,
    done: int,
    ro: Rollouts,
    rewards: torch.Tensor,
    batch: StepBatches,
    passes: Passes,
    adv: Advantages,
    update: Update,
    sync_metrics: dict[str, float],
    ev: dict[str, float],
    times: dict[str, float],
) -> dict[str, float]:
    """Log step ``done`` (metrics.jsonl, tensorboard, progress bar) and return its scalars: loss and
    optimizer, rewards and responses, KL and advantages, packing, rollout, sync, held-out accuracy and
    the phases' seconds."""
    flat = ro.completions()
    lengths = torch.tensor([len(c.token_ids) for c in flat], dtype=torch.float32)
    a = adv.values
    up = update.scalars()
    scalars = {
        **{key: up[key] for key in ("loss", "lr", "grad_norm", "skipped")},
        "reward_mean": float(rewards.mean()),
        "accuracy": float((rewards > 0).float().mean()),
        "penalty_rate": float((rewards < 0).float().mean()),
        "response_len": float(lengths.mean()),
        "truncated_rate": float(sum(c.truncated for c in flat) / max(len(flat), 1)),
        **{f"{d}_rate": r for d, r in ro.detector_rates.items() if d != "overlong"},  # overlong: truncated
        "kl_anchor": float(passes.kl.mean()),
        "adv_mean": float(a.mean()),
        "adv_abs": float(a.abs().mean()),
        "adv_std": float(a.std()) if a.numel() > 1 else 0.0,
        "anchor_reset": up["anchor_reset"],
        "mismatch_mean": passes.mismatch_mean,
        "mismatch_max": passes.mismatch_max,
        **passes.route,
        **batch.plan_stats(),
        **run.rollout.stats,
        **sync_metrics,
        **{key: v for key, v in up.items() if key.startswith(("m/", "moe/"))},
        **ev,
        **times,
    }
    if run.cfg.loss.tis_cap is not None:
        n_tok = max(batch.response_tokens(), 1)
        scalars |= {"tis_weight": adv.tis_weight_sum / n_tok, "tis_clip_frac": adv.tis_clipped / n_tok}
    run.logger.step(done, scalars, tokens=batch.response_tokens())
    return scalars
