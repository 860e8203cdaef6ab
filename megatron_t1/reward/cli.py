"""``python -m megatron_t1 score``: score a jsonl of responses with T1's reward, nothing else.

Each input line is a JSON object with a response and a reference answer (field names set by
flags), and optionally ``truncated`` (the generation hit its length limit) and a mean token
log-prob. The output holds the same objects, in order, plus ``reward``, ``reason`` and
``extracted``; it is written to a temporary file and renamed, so a failed run leaves no partial
output. A bad line stops the run before any scoring, with its file and line number.

    python -m megatron_t1 score --input responses.jsonl --output scored.jsonl \\
        --reward repetition_threshold=0.6 --num-workers 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from megatron_t1.atomic import atomic_file
from megatron_t1.reward.config import RewardConfig
from megatron_t1.reward.scorer import RewardScorer

__all__ = ["InputError", "add_arguments", "run"]


class InputError(ValueError):
    """A bad input line; the message starts with ``file:line:``."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``score`` command's flags to ``parser``."""
    parser.add_argument("--input", required=True, help="jsonl of responses to score")
    parser.add_argument(
        "--output", required=True, help="jsonl written: the input lines + reward, reason, extracted"
    )
    parser.add_argument("--response-field", default="response", help="field holding the response text")
    parser.add_argument("--gold-field", default="gold", help="field holding the reference answer")
    parser.add_argument(
        "--truncated-field",
        default="truncated",
        help="optional boolean field: the response hit the length limit (over-long penalty)",
    )
    parser.add_argument(
        "--logprob-field",
        default="mean_logprob",
        help="optional field: mean token log-prob (for --reward min_mean_logprob=X)",
    )
    parser.add_argument("--batch-size", type=int, default=4096, help="responses scored per pool pass")
    parser.add_argument("--num-workers", type=int, default=None, help="worker processes (reward.num_workers)")
    parser.add_argument("--timeout-s", type=float, default=None, help="per-answer timeout (reward.timeout_s)")
    parser.add_argument(
        "--reward",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="set a reward config field, e.g. --reward repetition_threshold=0.6 (repeatable)",
    )


def _parse_value(name: str, raw: str, tp: typing.Any) -> typing.Any:
    """Convert ``raw`` to the field type ``tp`` (int, float, bool, str, or X | None)."""
    options = typing.get_args(tp) or (tp,)
    if type(None) in options and raw.strip().lower() in ("none", "null"):
        return None
    for t in options:
        try:
            if t is bool:
                if raw.strip().lower() in ("true", "1", "yes"):
                    return True
                if raw.strip().lower() in ("false", "0", "no"):
                    return False
            elif t in (int, float, str):
                return t(raw)
        except ValueError:
            pass
    raise ValueError(f"--reward {name}={raw}: expected {tp}")


def _config(args: argparse.Namespace, base: RewardConfig | None) -> RewardConfig:
    cfg = dataclasses.asdict(base if base is not None else RewardConfig())
    hints = typing.get_type_hints(RewardConfig)
    for item in args.reward:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or name not in hints:
            raise ValueError(f"--reward {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(hints)}")
        cfg[name] = _parse_value(name, raw, hints[name])
    if args.num_workers is not None:
        cfg["num_workers"] = args.num_workers
    if args.timeout_s is not None:
        cfg["timeout_s"] = args.timeout_s
        cfg["wall_guard_s"] = max(cfg["wall_guard_s"], args.timeout_s + 0.5)
        cfg["stall_guard_s"] = max(cfg["stall_guard_s"], cfg["wall_guard_s"])
    return RewardConfig(**cfg)


def _records(path: Path, args: argparse.Namespace) -> Iterator[tuple[dict, str, str, bool, float | None]]:
    """Yield ``(object, response, gold, truncated, mean_logprob)`` per non-blank line; InputError
    names the file and line of the first bad one."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for key in (args.response_field, args.gold_field):
                if key not in obj:
                    raise InputError(f"{where}: missing field {key!r}")
            response, gold = obj[args.response_field], obj[args.gold_field]
            if not isinstance(response, str):
                raise InputError(f"{where}: {args.response_field!r} must be a string")
            if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
                raise InputError(f"{where}: {args.gold_field!r} must be a string or a number")
            truncated = obj.get(args.truncated_field, False)
            if not isinstance(truncated, bool):
                raise InputError(f"{where}: {args.truncated_field!r} must be true or false")
            logprob = obj.get(args.logprob_field)
            if logprob is not None and (isinstance(logprob, bool) or not isinstance(logprob, (int, float))):
                raise InputError(f"{where}: {args.logprob_field!r} must be a number")
            yield obj, response, str(gold), truncated, logprob


def _score_file(args: argparse.Namespace, cfg: RewardConfig, out: typing.TextIO) -> Counter:
    src = Path(args.input)
    for _ in _records(src, args):  # validate every line before starting workers
        pass
    reasons: Counter = Counter()
    total = 0.0
    with RewardScorer(cfg) as scorer:
        batch: list = []
        records = _records(src, args)
        while True:
            batch.clear()
            for rec in records:
                batch.append(rec)
                if len(batch) == args.batch_size:
                    break
            if not batch:
                break
            scored = scorer.score(
                [b[1] for b in batch],
                [b[2] for b in batch],
                truncated=[b[3] for b in batch],
                mean_logprobs=[b[4] for b in batch],
            )
            for i, (obj, *_) in enumerate(batch):
                reward, reason = scored.rewards[i], scored.reasons[i]
                obj.update(reward=reward, reason=reason, extracted=scored.extracted[i])
                out.write(json.dumps(obj, ensure_ascii=False) + "\n")
                reasons[reason] += 1
                total += reward
    reasons["_total_reward"] = total  # type: ignore[assignment]
    return reasons


def run(args: argparse.Namespace, config: RewardConfig | None = None) -> int:
    """Score ``args.input`` into ``args.output``; returns the exit code (0 ok, 2 bad input).

    ``config`` is the run's ``reward`` section when the caller loaded one; flags override it.
    """
    try:
        cfg = _config(args, config)
    except ValueError as e:
        print(f"score: {e}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("score: --batch-size must be >= 1", file=sys.stderr)
        return 2
    src, dst = Path(args.input), Path(args.output)
    if not src.is_file():
        print(f"score: input not found: {src}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        with atomic_file(dst) as out:  # a bad line propagates through it: dst untouched, temporary gone
            reasons = _score_file(args, cfg, out)
    except InputError as e:
        print(f"score: {e}", file=sys.stderr)
        return 2
    total = reasons.pop("_total_reward")
    n = sum(reasons.values())
    summary = ", ".join(f"{k} {v}" for k, v in reasons.most_common())
    print(
        f"scored {n} responses in {time.perf_counter() - start:.1f} s: mean reward "
        f"{total / max(n, 1):.4f} ({summary}) -> {dst}"
    )
    return 0


if __name__ == "__main__":  # python -m megatron_t1.reward.cli (the lead wires `python -m megatron_t1 score`)
    _parser = argparse.ArgumentParser(prog="score", description=__doc__.split("\n\n")[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
