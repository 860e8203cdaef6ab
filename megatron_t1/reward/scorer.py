"""T1's reward r in {1, 0, -1} for a batch of responses (arXiv 2501.11651, Sec. 3.2, step 2).

``r = penalty`` (-1) if any enabled detector fires (:mod:`~megatron_t1.reward.penalties`: the
penalty overrides correctness), else ``correct`` (1) if the extracted final answer equals the
reference under math-verify, else ``wrong`` (0): wrong, missing, too complex, timed out.

Scoring runs in a :class:`~megatron_t1.reward.pool.WorkerPool` of worker processes: each answer
is extracted, parsed and compared under a ``timeout_s`` CPU-time budget (SIGPROF) in its worker,
and the parent kills and replaces a worker stuck past ``wall_guard_s`` (see the config fields).
The responses of one reference form a group that one worker drains (see the pool): it parses the
reference once, first, keeps it for the batch, and meets each distinct answer string of the
group in math-verify's parse cache; a reference that fails or times out fails once, not once
per response. (Parsed references are not shipped between processes: unpickling rebuilds
math-verify's unevaluated sympy trees in canonical order, which changes some comparisons, e.g.
``Monday`` against ``\\text{Monday}``.)

    with RewardScorer(cfg) as scorer:          # workers start here, in the background
        batch = scorer.score(responses, golds, truncated=flags)
    batch.rewards, batch.reasons, batch.metrics

:func:`compute_rewards` does the same with a pool that lives for one call (start-up ~2-3 s).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megatron_t1.reward.config import RewardConfig
from megatron_t1.reward.extract import extract_answer, gold_choice
from megatron_t1.reward.penalties import DETECTORS, detect
from megatron_t1.reward.pool import TaskResult, WorkerPool

__all__ = ["REASONS", "RewardBatch", "RewardScorer", "compute_rewards"]

# CPU a worker may spend on an answer beyond timeout_s before the parent calls it stuck: the
# detectors and extraction run before the timer is armed (tens of ms on a 200k-character response).
_CPU_MARGIN_S = 0.25

REASONS = (
    "correct",
    "wrong",
    "no_answer",
    "too_complex",
    "timeout",
    "worker_died",
    "gold_unparsable",
    "error",
    *DETECTORS,
)
"""Every reason a response can get: an outcome of the comparison, or the detector that fired."""


@dataclass
class RewardBatch:
    """Rewards of a batch of N responses, in input order.

    Attributes:
        rewards: N floats in {correct, wrong, penalty} (default {1.0, 0.0, -1.0}).
        reasons: N entries of :data:`REASONS`: the detector that decided a penalty, else the outcome.
        extracted: N extracted final answers (None when none was found).
        penalties: N tuples of every detector that fired (the first one is the reason).
        metrics: ``reward/mean``, ``reward/reason/<reason>`` and ``reward/penalty/<detector>``
            (fractions of N), ``reward/timeouts``, ``reward/gold_timeouts``,
            ``reward/worker_restarts`` (counts), ``reward/seconds`` (wall time of the call).
    """

    rewards: list[float]
    reasons: list[str]
    extracted: list[str | None]
    penalties: list[tuple[str, ...]]
    metrics: dict[str, float]

    def __len__(self) -> int:
        return len(self.rewards)


# --------------------------------------------------------------------------------------------------
# Worker side (runs in the pool's processes, or in-process when num_workers == 0)
# --------------------------------------------------------------------------------------------------


def _init_worker(cfg: RewardConfig) -> RewardConfig:
    from megatron_t1.reward.math_answer import warm_up

    warm_up()
    return cfg


def _gold(text: str, cache: dict, cfg: RewardConfig) -> list:
    """The parsed reference from the worker's batch cache, else parsed now (call under the timer).
    An empty list: it cannot be parsed (or timed out before)."""
    from megatron_t1.reward.math_answer import parse_math

    key = ("gold", text)
    if key not in cache:
        cache[key] = parse_math(text, max_number_bits=cfg.max_number_bits)[0]
    return cache[key]


def _handle(task: tuple, cache: dict, cfg: RewardConfig) -> tuple | str:
    """One pool task. ``("gold", text)`` -> "ok" | "empty" | "timeout" (the parse stays cached).
    ``("score", response, truncated, mean_logprob, gold_text, letter)`` -> (reward, reason,
    extracted, penalties); ``gold_text`` is None for a multiple-choice ``letter``."""
    from megatron_t1.reward.math_answer import AnswerTimeout, answer_timeout, is_equivalent, parse_math

    if task[0] == "gold":
        try:
            with answer_timeout(cfg.timeout_s):
                return "ok" if _gold(task[1], cache, cfg) else "empty"
        except AnswerTimeout:
            cache[("gold", task[1])] = []  # the group's responses fail fast instead of retrying
            return "timeout"

    _, response, truncated, mean_logprob, gold, letter = task
    fired = detect(response, truncated=truncated, mean_logprob=mean_logprob, cfg=cfg)
    extracted = extract_answer(
        response,
        choice=letter is not None,
        thinking_end=cfg.thinking_end,
        answer_from_thinking=cfg.answer_from_thinking,
    )
    if fired:
        return (cfg.penalty, fired[0], extracted, fired)
    if extracted is None:
        return (cfg.wrong, "no_answer", None, ())
    if letter is not None:
        ok = extracted == letter
        return (cfg.correct if ok else cfg.wrong, "correct" if ok else "wrong", extracted, ())
    if cache.get(("gold", gold)) == []:
        return (cfg.wrong, "gold_unparsable", extracted, ())
    if len(extracted) > cfg.max_answer_chars:
        return (cfg.wrong, "too_complex", extracted, ())
    try:
        with answer_timeout(cfg.timeout_s):
            parsed_gold = _gold(gold, cache, cfg)  # cached unless this worker helps another's group
            if not parsed_gold:
                return (cfg.wrong, "gold_unparsable", extracted, ())
            pred, dropped = parse_math(extracted, max_number_bits=cfg.max_number_bits)
            ok = is_equivalent(parsed_gold, pred)
    except AnswerTimeout:
        return (cfg.wrong, "timeout", extracted, ())
    reason = "correct" if ok else ("too_complex" if dropped else "wrong")
    return (cfg.correct if ok else cfg.wrong, reason, extracted, ())


class _InProcess:
    """The pool's interface, run in this process (num_workers=0): no wall guard."""

    restarts = 0

    def __init__(self, cfg: RewardConfig) -> None:
        self._context = _init_worker(cfg)
        self._cache: dict = {}
        self._scope: Any = None

    def run(self, tasks: Sequence, scope: Any = None, groups: Sequence | None = None) -> list[TaskResult]:
        if scope is None or scope != self._scope:
            self._cache.clear()
            self._scope = scope
        out = []
        for task in tasks:
            try:
                out.append(TaskResult("ok", _handle(task, self._cache, self._context)))
            except Exception as e:
                out.append(TaskResult("error", f"{type(e).__name__}: {e}"))
        return out

    def wait_ready(self) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------------


class RewardScorer:
    """Scores batches with a pool kept for the scorer's lifetime; a context manager.

    Creating it starts ``cfg.num_workers`` workers in the background (each imports math-verify and
    warms up, ~1-2 s); :meth:`score` waits for them if needed. Always :meth:`close` it (or use
    ``with``). The workers are fresh interpreters that do not re-run the calling script, so a
    script needs no ``if __name__ == "__main__":`` guard.
    """

    def __init__(self, config: RewardConfig | None = None) -> None:
        self.cfg = config if config is not None else RewardConfig()
        self._batches = 0
        if self.cfg.num_workers == 0:
            self._runner: Any = _InProcess(self.cfg)
        else:
            self._runner = WorkerPool(
                _handle,
                num_workers=self.cfg.num_workers,
                wall_timeout_s=self.cfg.wall_guard_s,
                cpu_timeout_s=self.cfg.timeout_s + _CPU_MARGIN_S,
                stall_timeout_s=self.cfg.stall_guard_s,
                start_timeout_s=self.cfg.worker_start_timeout_s,
                init=_init_worker,
                init_args=(self.cfg,),
            )

    def wait_ready(self) -> None:
        """Block until every worker has started (useful before timing)."""
        self._runner.wait_ready()

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the workers (empty in-process)."""
        return list(getattr(self._runner, "pids", []))

    def close(self) -> None:
        self._runner.close()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def score(
        self,
        responses: Sequence[str],
        golds: Sequence[str],
        *,
        truncated: Sequence[bool],
        mean_logprobs: Sequence[float | None] | None = None,
    ) -> RewardBatch:
        """Rewards of N responses against their N references (see :class:`RewardBatch`).

        Args:
            responses: N generated texts (thinking and summary).
            golds: N reference answers: LaTeX / plain text (``"\\frac{1}{2}"``, ``"$x=3$"``,
                ``"\\boxed{5}"``, numbers are accepted) or a choice letter (``"C"``, ``"(C)"``).
            truncated: N flags from the engine: the response hit the generation limit.
            mean_logprobs: N mean token log-probs under the policy (nats), for the perplexity
                detector; None (or None entries) skips it.
        """
        start = time.perf_counter()
        n = len(responses)
        restarts0 = self._runner.restarts
        n_lp = None if mean_logprobs is None else len(mean_logprobs)
        if len(golds) != n or len(truncated) != n or n_lp not in (None, n):
            raise ValueError(
                f"compute_rewards: {n} responses but {len(golds)} golds, {len(truncated)} "
                f"truncated flags, {n_lp} log-probs"
            )
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise TypeError(f"compute_rewards: response {i} is {type(r).__name__}, not str")
        gold_strs = []
        for i, g in enumerate(golds):
            if isinstance(g, bool) or not isinstance(g, (str, int, float)):
                raise TypeError(f"compute_rewards: gold {i} is {type(g).__name__}, not str")
            gold_strs.append(str(g))
        lps = list(mean_logprobs) if mean_logprobs is not None else [None] * n

        # One group per reference: its parse task first, then its responses (letters need no parse).
        from megatron_t1.reward.math_answer import gold_text

        self._batches += 1
        letters = [gold_choice(g) for g in gold_strs]
        texts = [None if c is not None else gold_text(g) for g, c in zip(gold_strs, letters)]
        unique = list(dict.fromkeys(t for t in texts if t is not None))
        tasks = [("gold", t) for t in unique]
        tasks += [("score", responses[i], bool(truncated[i]), lps[i], texts[i], letters[i]) for i in range(n)]
        groups = unique + [t if t is not None else ("choice", c) for t, c in zip(texts, letters)]
        everything = self._runner.run(tasks, scope=self._batches, groups=groups)
        gold_results, results = everything[: len(unique)], everything[len(unique) :]
        gold_timeouts = sum(r.status == "timeout" or r.value == "timeout" for r in gold_results)

        rewards, reasons, extracted, penalties = [], [], [], []
        for i, res in enumerate(results):
            if res.status == "ok":
                reward, reason, ans, fired = res.value
            else:  # killed, dead or crashed: the penalties still apply (pure, cheap, run here)
                fired = detect(responses[i], truncated=bool(truncated[i]), mean_logprob=lps[i], cfg=self.cfg)
                ans = extract_answer(
                    responses[i],
                    choice=letters[i] is not None,
                    thinking_end=self.cfg.thinking_end,
                    answer_from_thinking=self.cfg.answer_from_thinking,
                )
                failure = {"timeout": "timeout", "died": "worker_died"}.get(res.status, "error")
                reward, reason = (self.cfg.penalty, fired[0]) if fired else (self.cfg.wrong, failure)
            rewards.append(float(reward))
            reasons.append(reason)
            extracted.append(ans)
            penalties.append(tuple(fired))
        metrics = _metrics(rewards, reasons, penalties)
        metrics["reward/gold_timeouts"] = float(gold_timeouts)
        metrics["reward/worker_restarts"] = float(self._runner.restarts - restarts0)
        metrics["reward/seconds"] = time.perf_counter() - start
        return RewardBatch(rewards, reasons, extracted, penalties, metrics)


def _metrics(rewards: list[float], reasons: list[str], penalties: list[tuple[str, ...]]) -> dict[str, float]:
    n = max(len(rewards), 1)
    m = {"reward/mean": sum(rewards) / n}
    for r in REASONS:
        m[f"reward/reason/{r}"] = sum(x == r for x in reasons) / n
    for d in DETECTORS:
        m[f"reward/penalty/{d}"] = sum(d in p for p in penalties) / n
    m["reward/timeouts"] = float(sum(x == "timeout" for x in reasons))
    return m


def compute_rewards(
    responses: Sequence[str],
    golds: Sequence[str],
    *,
    truncated: Sequence[bool],
    mean_logprobs: Sequence[float | None] | None = None,
    config: RewardConfig | None = None,
) -> RewardBatch:
    """T1 rewards for one batch with a pool that lives for this call (see :class:`RewardScorer`
    to keep the workers across batches). Arguments as :meth:`RewardScorer.score`."""
    with RewardScorer(config) as scorer:
        return scorer.score(responses, golds, truncated=truncated, mean_logprobs=mean_logprobs)
