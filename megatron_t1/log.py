"""Console progress and tensorboard scalars for a run folder (rank 0 writes, others stay quiet)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


class RunLogger:
    """Writes ``runs/NAME/tb/`` events, ``runs/NAME/metrics.jsonl`` and a tqdm bar with tokens/s.

    Only the logging rank (``enabled=True``) touches files or the console.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        progress_bar: bool = True,
        desc: str = "train",
    ):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._tb = None
        self._bar = None
        self._t_last = time.perf_counter()
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))
            except ImportError:  # tensorboard not installed: keep the jsonl log
                self._tb = None
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)

    @classmethod
    def for_run(cls, cfg, *, enabled: bool, start_step: int, desc: str) -> RunLogger:
        """The logger of a training run: ``cfg.run.run_dir``, ``cfg.run.train_steps`` and ``cfg.log``."""
        return cls(
            cfg.run.run_dir,
            enabled=enabled,
            total_steps=cfg.run.train_steps,
            start_step=start_step,
            tensorboard=cfg.log.tensorboard,
            progress_bar=cfg.log.progress_bar,
            desc=desc,
        )

    def step(self, step: int, scalars: dict[str, float], *, tokens: int = 0, advance: bool = True) -> None:
        """Record one step's scalars (``step`` counts from 1; ``advance=False`` for a record that is not
        a training step, e.g. the evaluation of the initial policy at step 0)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        dt = max(now - self._t_last, 1e-9)
        self._t_last = now
        scalars = dict(scalars)
        if tokens:
            scalars["tokens_per_s"] = tokens / dt
        scalars["step_time_s"] = dt
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        keys = ("loss", "reward_mean", "accuracy", "heldout_accuracy", "lr", "grad_norm", "tokens_per_s")
        short = {k: scalars[k] for k in keys if k in scalars}
        text = " ".join(f"{k}={v:.4g}" for k, v in short.items())
        if self._bar is not None:
            self._bar.update(1 if advance else 0)
            self._bar.set_postfix_str(text)
        else:
            print(f"step {step}: {text}", flush=True)

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self.enabled:
            self._jsonl.close()
