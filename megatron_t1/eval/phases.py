"""The two phases of an eval run (``python -m megatron_t1 eval``; :func:`megatron_t1.eval.cli.run_eval`).

* **Benchmark phase** (:func:`benchmark_phase`): each checkpoint in turn samples ``n`` responses per
  problem of every benchmark and T1's reward scores them; every response goes to ``responses.jsonl``,
  pass@1 per benchmark, subject and level to ``results.csv``.
* **Scaling phase** (:func:`scaling_phase`): accuracy as a function of the thinking budget
  (:func:`megatron_t1.eval.scaling.budget_sweep`) on the same samples; every summarising pass goes to
  ``scaling_responses.jsonl``, one row per (checkpoint, benchmark, budget) to ``scaling.csv``, the
  curves to ``scaling.png``.

The scaling phase is a context around the benchmark phase, which hands it each benchmark's samples
(:meth:`ScalingSweep.sweep`) while their checkpoint is still loaded: the policy summarises its own
truncated thinking without being loaded a second time, and the samples (500 problems x 32 x 16k tokens
is 256M token ids) are dropped before the next benchmark is generated. Every file is written
atomically (:mod:`megatron_t1.data.io`, :mod:`megatron_t1.atomic`): a failed run leaves neither a
partial file nor a temporary one.
"""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from megatron_t1.atomic import write_text_atomic
from megatron_t1.data.io import JsonlWriter, open_jsonl_atomic
from megatron_t1.eval.benchmark import (
    RESULT_COLUMNS,
    BenchmarkResult,
    format_table,
    generate_and_score,
    result_rows,
)
from megatron_t1.eval.loaders import EvalProblem
from megatron_t1.eval.plot import plot_scaling
from megatron_t1.eval.scaling import SCALING_COLUMNS, Summariser, budget_sweep

__all__ = ["ScalingSweep", "benchmark_phase", "scaling_phase"]

Loaded = tuple[str, object, object]
"""A loaded checkpoint: ``(label, engine, tokenizer)``."""


def _csv_text(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r[c]) for c in columns})
    return buf.getvalue()


def benchmark_phase(
    checkpoints: Sequence[str],
    benchmarks: dict[str, list[EvalProblem]],
    out: Path,
    scorer,
    *,
    load: Callable[[str], AbstractContextManager[Loaded]],
    n: int,
    params,
    system: str | None = None,
    on_samples: Callable[[str, object, object, list[EvalProblem], list], None] | None = None,
    log: Callable[[str], None] = print,
) -> list[BenchmarkResult]:
    """pass@1 of every checkpoint on every benchmark; writes ``responses.jsonl`` and ``results.csv``.

    Args:
        checkpoints: the ``[LABEL=]DIR`` specs, in order.
        benchmarks: name -> problems.
        out: the run folder.
        scorer: a :class:`~megatron_t1.reward.RewardScorer` (one pool for the whole run).
        load: ``spec -> context manager of (label, engine, tokenizer)``; the engine is loaded for the
            block (and released, its HF export removed, when it ends).
        n: samples per problem.
        params: :class:`~megatron_t1.rollout.engine.SamplingParams` of the generation.
        on_samples: called after each benchmark with ``(label, engine, tokenizer, problems, samples)``
            while the engine is loaded (:meth:`ScalingSweep.sweep`).

    Returns:
        One result per (checkpoint, benchmark), checkpoint-major.
    """
    results = []
    with open_jsonl_atomic(out / "responses.jsonl") as responses:
        for spec in checkpoints:
            with load(spec) as (label, engine, tokenizer):
                for name, problems in benchmarks.items():
                    res, records, samples = generate_and_score(
                        engine,
                        tokenizer,
                        problems,
                        scorer,
                        n=n,
                        params=params,
                        checkpoint=label,
                        system=system,
                        progress=lambda m: log(f"[eval] {m}"),
                    )
                    responses.write(records)
                    results.append(res)
                    log(
                        f"[eval] {label} / {name}: pass@1 = {res.overall.accuracy:.4f} "
                        f"+- {res.overall.stderr:.4f} ({res.overall.num_problems} problems x {n})"
                    )
                    if on_samples is not None:
                        on_samples(label, engine, tokenizer, problems, samples)
                    del records, samples  # not alive while the next benchmark is generated
    rows = [r for res in results for r in result_rows(res)]
    write_text_atomic(out / "results.csv", _csv_text(rows, RESULT_COLUMNS), newline="")
    log("\n" + format_table(rows, RESULT_COLUMNS))
    return results


@dataclass
class ScalingSweep:
    """The budget sweep of one run, benchmark by benchmark (see :func:`scaling_phase`)."""

    budgets: Sequence[int]
    scorer: object
    records: JsonlWriter
    """Where every record of the sweep goes (``scaling_responses.jsonl``)."""
    summary_params: object
    """:class:`~megatron_t1.rollout.engine.SamplingParams` of the summarising pass."""
    scaling_limit: int | None = None
    """Sweep the first N problems of each benchmark only (None: all)."""
    summariser: Summariser | None = None
    """A separate summariser; None: each checkpoint summarises itself."""
    system: str | None = None
    log: Callable[[str], None] = print
    rows: list[dict] = field(default_factory=list)
    """The table so far: one row per (checkpoint, benchmark, budget)."""

    def sweep(self, label: str, engine, tokenizer, problems: list[EvalProblem], samples: list) -> None:
        """Sweep the budgets on one benchmark's samples (the benchmark phase's ``on_samples``)."""
        summariser = self.summariser or Summariser(engine, tokenizer, True, self.system)
        rows, records = budget_sweep(
            problems[: self.scaling_limit],  # [:None]: every problem
            samples[: self.scaling_limit],
            tokenizer,
            self.budgets,
            self.scorer,
            summariser,
            summary_params=self.summary_params,
            checkpoint=label,
            progress=lambda m: self.log(f"[eval] {m}"),
        )
        self.records.write(records)
        self.rows.extend(rows)


@contextlib.contextmanager
def scaling_phase(
    out: Path,
    budgets: Sequence[int],
    scorer,
    *,
    summary_params,
    scaling_limit: int | None = None,
    load_summariser: Callable[[], Summariser] | None = None,
    system: str | None = None,
    log: Callable[[str], None] = print,
) -> Iterator[ScalingSweep]:
    """Accuracy vs thinking budget around the benchmark phase, which calls the yielded sweep's
    :meth:`~ScalingSweep.sweep` after each benchmark.

    ``load_summariser`` loads a separate summariser (closed when the block ends); None: each
    checkpoint summarises its own thinking. When the block ends without an error,
    ``scaling_responses.jsonl`` appears, then (if the sweep has rows) ``scaling.csv`` and
    ``scaling.png``, and the table is printed; on an error nothing of it appears.
    """
    with open_jsonl_atomic(out / "scaling_responses.jsonl") as records:
        summariser = load_summariser() if load_summariser is not None else None
        try:
            sweep = ScalingSweep(
                budgets,
                scorer,
                records,
                summary_params,
                scaling_limit=scaling_limit,
                summariser=summariser,
                system=system,
                log=log,
            )
            yield sweep
        finally:
            if summariser is not None:
                summariser.engine.close()
    if sweep.rows:
        write_text_atomic(out / "scaling.csv", _csv_text(sweep.rows, SCALING_COLUMNS), newline="")
        plot_scaling(sweep.rows, out / "scaling.png")
        log("\n" + format_table(sweep.rows, SCALING_COLUMNS))
