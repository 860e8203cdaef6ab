"""The demo's task files: trace options reach the SFT data, bad options are one clear error, the
validation problems are disjoint from the held-out ones and leave them unchanged, and the paired
difference of per-problem scores matches a plain float64 computation."""

from __future__ import annotations

import json
import math

import pytest

from megatron_t1.demo import build_task, paired_difference, parse_trace_options


def _wrong_share(path) -> float:
    """Share of the check lines of the SFT traces that fail (a wrong attempt, then a retry)."""
    checks = [
        line
        for row in map(json.loads, path.read_text().splitlines())
        for line in row["messages"][-1]["content"].splitlines()
        if line.startswith("check: ")
    ]
    return sum(line.endswith(", wrong") for line in checks) / len(checks)


def test_trace_options_change_the_sft_data_only(tmp_path):
    kw = dict(seed=3, n_train=300, n_heldout=20, vocab_size=400)
    base = build_task(tmp_path / "base", **kw)
    more = build_task(tmp_path / "more", **kw, trace={"error_rate": 0.5})
    # attempts 1-2 of 3 are wrong with probability e: (e + e^2) / (1 + e + e^2) of the checks fail,
    # 0.238 at the default e = 0.25, 0.429 at e = 0.5
    assert 0.21 < _wrong_share(base["train"]) < 0.27 and 0.40 < _wrong_share(more["train"]) < 0.46
    for part in ("rl", "heldout"):  # the problems are the same
        assert base[part].read_text() == more[part].read_text()
    with pytest.raises(ValueError, match="unknown trace option"):
        build_task(tmp_path / "bad", **kw, trace={"max_attempts": 2})


def test_validation_problems_are_disjoint_and_leave_the_heldout_set_alone(tmp_path):
    kw = dict(seed=3, n_train=100, n_heldout=50, vocab_size=400)
    plain = build_task(tmp_path / "plain", **kw)
    with_val = build_task(tmp_path / "val", **kw, n_validation=30)
    assert plain["heldout"].read_text() == with_val["heldout"].read_text()

    def questions(path):
        return [json.loads(line)["question"] for line in path.read_text().splitlines()]

    val, test = questions(with_val["validation"]), questions(with_val["heldout"])
    assert len(val) == len(set(val)) == 30 and not set(val) & set(test)
    rl = set(questions(with_val["rl"]))
    assert not set(val) & rl  # the RL prompts come from the train split
    assert questions(plain["validation"]) == []


def test_parse_trace_options():
    assert parse_trace_options(["error_rate=0.4", "restate=false", "truncated_fraction=0"]) == {
        "error_rate": 0.4,
        "restate": False,
        "truncated_fraction": 0.0,
    }
    assert parse_trace_options(None) == {}
    for bad, msg in (
        ("n_operands=3", "KEY one of"),
        ("error_rate", "KEY one of"),
        ("error_rate=high", "takes a float"),
        ("restate=yes please", "true or false"),
    ):
        with pytest.raises(ValueError, match=msg):
            parse_trace_options([bad])


def test_bad_task_option_is_one_line_and_writes_nothing(tmp_path, capsys):
    from megatron_t1.__main__ import main

    out = tmp_path / "demo"
    assert main(["demo", "--task-set", "max_attempts=2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --task-set 'max_attempts=2'") and err.count("\n") == 1
    assert not out.exists()


def test_paired_difference_matches_float64_reference():
    sft = {f"p{i}": float(i % 3 == 0) for i in range(50)}
    rl = {f"p{i}": float(i % 2 == 0) for i in range(50)}
    rl["only_rl"] = 1.0  # problems evaluated by one side only are left out
    d = [rl[k] - sft[k] for k in sft]
    mean = math.fsum(d) / len(d)
    se = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    got = paired_difference(sft, rl)
    assert got[0] == pytest.approx(mean, abs=1e-15) and got[1] == pytest.approx(se, rel=1e-12)
    assert all(math.isnan(x) for x in paired_difference({"a": 1.0}, {"a": 0.0}))
