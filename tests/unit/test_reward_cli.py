"""The reward-only CLI: jsonl in, the same lines plus reward/reason/extracted out, atomically."""

from __future__ import annotations

import argparse
import json

import pytest

from megatron_t1.reward.cli import add_arguments, run
from megatron_t1.reward.config import RewardConfig


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def _write(path, rows):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


ROWS = [
    {"id": 1, "response": "so \\boxed{\\frac{1}{2}}", "gold": "0.5"},
    {"id": 2, "response": "The answer is 7", "gold": 8},
    {"id": 3, "response": "Answer: C", "gold": "C", "truncated": True},
    {"id": 4, "response": "ünïcödé \\boxed{3}", "gold": "3", "mean_logprob": -9.5},
]


def test_scores_file_with_pool(tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out" / "scored.jsonl"
    _write(src, ROWS[:2] + [""] + ROWS[2:])  # blank lines are skipped
    assert run(_args("--input", str(src), "--output", str(dst), "--reward", "min_mean_logprob=-5")) == 0
    out = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    assert [o["id"] for o in out] == [1, 2, 3, 4]
    assert [(o["reward"], o["reason"]) for o in out] == [
        (1.0, "correct"),
        (0.0, "wrong"),
        (-1.0, "overlong"),
        (-1.0, "perplexity"),
    ]
    assert out[0]["extracted"] == "\\frac{1}{2}" and out[0]["response"] == ROWS[0]["response"]
    assert out[3]["response"] == ROWS[3]["response"]  # unicode kept
    assert "scored 4 responses" in capsys.readouterr().out
    assert [p.name for p in dst.parent.iterdir()] == ["scored.jsonl"]  # no temp file left


def test_field_names_and_batches(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "scored.jsonl"
    rows = [{"completion": f"\\boxed{{{i}}}", "answer": str(i % 3), "cut": False} for i in range(7)]
    _write(src, rows)
    code = run(
        _args(
            "--input",
            str(src),
            "--output",
            str(dst),
            "--response-field",
            "completion",
            "--gold-field",
            "answer",
            "--truncated-field",
            "cut",
            "--batch-size",
            "3",
            "--num-workers",
            "0",
        )
    )
    assert code == 0
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["reward"] for o in out] == [1.0 if i < 3 else 0.0 for i in range(7)]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "in.jsonl:2: not valid JSON"),
        ('["a list"]', "in.jsonl:2: expected a JSON object"),
        ('{"response": "x"}', "in.jsonl:2: missing field 'gold'"),
        ('{"response": 3, "gold": "1"}', "in.jsonl:2: 'response' must be a string"),
        ('{"response": "x", "gold": "1", "truncated": "y"}', "in.jsonl:2: 'truncated' must be true or false"),
        ('{"response": "x", "gold": 1, "mean_logprob": "x"}', "in.jsonl:2: 'mean_logprob' must be a number"),
    ],
)
def test_bad_line_names_file_and_line_and_writes_nothing(tmp_path, capsys, line, message):
    src, dst = tmp_path / "in.jsonl", tmp_path / "scored.jsonl"
    _write(src, [ROWS[0], line, ROWS[1]])
    dst.write_text("previous\n")
    assert run(_args("--input", str(src), "--output", str(dst), "--num-workers", "0")) == 2
    assert message in capsys.readouterr().err
    assert dst.read_text() == "previous\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "scored.jsonl"]


def test_config_flags(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    _write(src, ROWS[:1])
    args = _args("--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--reward", "no_such_field=1")
    assert run(args) == 2
    assert "no_such_field" in capsys.readouterr().err
    args = _args("--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--reward", "timeout_s=-1")
    assert run(args) == 2
    assert "reward.timeout_s" in capsys.readouterr().err
    assert run(_args("--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl"))) == 2
    assert "input not found" in capsys.readouterr().err


def test_run_takes_the_run_config(tmp_path):
    """``run(args, config)``: the caller's reward section is the base, flags override it."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    _write(src, [{"response": "\\boxed{1}", "gold": "1", "truncated": True}])
    assert (
        run(
            _args("--input", str(src), "--output", str(dst)),
            RewardConfig(num_workers=0, overlong_enabled=False),
        )
        == 0
    )
    assert json.loads(dst.read_text())["reason"] == "correct"
    assert (
        run(
            _args("--input", str(src), "--output", str(dst), "--reward", "overlong_enabled=true"),
            RewardConfig(num_workers=0, overlong_enabled=False),
        )
        == 0
    )
    assert json.loads(dst.read_text())["reason"] == "overlong"
