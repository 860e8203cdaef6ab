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

Each phase is one function of :mod:`megatron_t1.train.rl_phases`; :func:`run_rl` is the loop.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from megatron_t1.atomic import atomic_dir
from megatron_t1.config import Config
from megatron_t1.convert.offline import mcore_to_hf
from megatron_t1.mcore.checkpoint import step_dir_name
from megatron_t1.train.rl_phases import (
    PhaseTimes,
    RLRun,
    Update,
    advantage_phase,
    anchor_phase,
    best_step,
    checkpoint_phase,
    eval_phase,
    exits_after,
    initial_eval_phase,
    log_phase,
    logprob_phase,
    pack_phase,
    rollout_phase,
    score_phase,
    select_phase,
    setup,
    update_phase,
)

__all__ = ["best_step", "export_hf", "run_rl"]


def run_rl(cfg: Config) -> dict:
    """Train with T1's RL recipe; returns a summary of the last step."""
    t0 = time.perf_counter()
    run = setup(cfg)
    initial_eval_phase(run)  # the validation curve's step 0
    scalars: dict[str, float] = {}
    done = run.start
    for step in range(run.start, cfg.run.train_steps):
        done, times = step + 1, PhaseTimes()
        ro = rollout_phase(run, step)  # K responses per prompt, on every rollout engine
        times.lap("rollout_s")
        rewards = score_phase(run, ro)  # {1, 0, -1} per response
        times.lap("reward_s")
        sel = select_phase(run, rewards, step)  # keep k of K
        batch = pack_phase(run, ro, sel)  # mini-batches of packed, DP-balanced micro-batches
        times.restart()  # selection and packing are not timed
        passes = logprob_phase(run, batch)  # policy + anchor log-probs -> KL_i, mismatch
        times.lap("logprob_s")
        adv = advantage_phase(run, batch, sel, passes)  # A_i (RLOO of r_i - beta KL_i) per token
        passes.policy = passes.anchor = None  # on GPU the passes' outputs; the micro-batches hold copies
        times.restart()
        results, actions = [], []
        for j in range(batch.num_minibatches):  # one optimizer step each; the anchor follows each
            results.append(update_phase(run, batch, j, step))
            actions.append(anchor_phase(run, results[-1], step * batch.num_minibatches + j + 1))
        update = Update(results, actions)
        run.guard.update(update.skipped, done)  # too many skipped steps in a row: stop
        times.lap("train_s")
        sync_res = run.rollout.sync(run.sync, run.chunks)  # the new policy to the rollout engines
        times.lap("sync_s")
        ev = eval_phase(run, done, times)
        checkpoint_phase(run, done, times)
        scalars = log_phase(run, done, ro, rewards, batch, passes, adv, update, sync_res.metrics(), ev, times)
        if exits_after(run, done):
            run.logger.info(f"exit_interval: stopping after step {done} (checkpoint saved; rerun to resume)")
            break
    return finish(run, done, scalars, t0)


def finish(run: RLRun, done: int, scalars: dict[str, float], t0: float) -> dict:
    """Close the scorer; after a completed run, export the final (and the best) policy as HF folders;
    close the logger and the engines; the run's summary."""
    cfg, ctx = run.cfg, run.ctx
    if run.scorer is not None:
        run.scorer.close()
    hf_dir = best_dir = None
    best = best_step(run.evals) if cfg.checkpoint.keep_best else None
    if (
        run.start < cfg.run.train_steps
        and scalars
        and not (cfg.run.exit_interval and done < cfg.run.train_steps)
    ):
        if ctx.world_size > 1:
            dist.barrier()
        hf_dir = cfg.run.run_dir / "hf"
        if ctx.rank == 0:
            export_hf(cfg, run.ckpt_root, hf_dir)
            run.logger.info(f"final policy exported as an HF folder: {hf_dir}")
        if best is not None:
            best_dir = cfg.run.run_dir / "hf_best"
            if ctx.rank == 0:
                _export_best(cfg, run.ckpt_root, best, done, hf_dir, best_dir)
                run.logger.info(
                    f"best held-out accuracy {run.evals[best]:.4f} at step {best} "
                    f"(of steps {sorted(run.evals)}); exported as {best_dir}"
                )
    run.logger.close()
    # Last: closing an external-launcher vLLM engine tears down torch.distributed (vLLM's own cleanup).
    run.rollout.close()
    return {
        "run_dir": str(cfg.run.run_dir),
        "hf_dir": str(hf_dir) if hf_dir else None,
        "best_hf_dir": str(best_dir) if best_dir else None,
        "best_step": best,
        "evals": dict(sorted(run.evals.items())),
        **{key: v for key, v in scalars.items() if not key.startswith("m/")},
        "wall_seconds": time.perf_counter() - t0,
    }


def export_hf(cfg: Config, ckpt_root: Path, out: Path) -> Path:
    """The converter's mcore -> HF of the newest checkpoint, plus the tokenizer files (atomic: an old
    ``out`` is replaced only by a complete export)."""
    with atomic_dir(out, replace=True) as tmp:
        tmp.rmdir()  # mcore_to_hf creates its output folder
        mcore_to_hf(ckpt_root, tmp, progress=False)
        if cfg.model.tokenizer:
            for f in Path(cfg.model.tokenizer).iterdir():
                if f.is_file() and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
    return out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def _export_best(cfg: Config, ckpt_root: Path, best: int, last: int, hf_dir: Path, out: Path) -> None:
    """``hf_best/``: hard links to ``hf/`` when the last step is the best, else its own export."""
    if best == last:
        with atomic_dir(out, replace=True) as tmp:
            tmp.rmdir()
            shutil.copytree(hf_dir, tmp, copy_function=_link_or_copy)
    else:
        export_hf(cfg, ckpt_root / step_dir_name(best), out)
