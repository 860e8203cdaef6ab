"""tools/compare_runs.py: equal numbers pass, any changed number or key fails, timing is ignored."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from compare_runs import compare_runs, is_timing  # noqa: E402


def _run(folder: Path, records: list[dict], eval_csv: str | None = None) -> Path:
    (folder / "rl").mkdir(parents=True)
    (folder / "rl" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if eval_csv is not None:
        (folder / "eval").mkdir()
        (folder / "eval" / "results.csv").write_text(eval_csv)
    return folder


REC = [{"step": 1, "loss": 0.5, "kl_anchor": float("nan"), "rollout_s": 3.0, "sync/gb_per_s": 1.0}]


def test_same_numbers_pass_and_timing_is_ignored(tmp_path):
    a = _run(tmp_path / "a", REC, "x,1\n")
    b = _run(tmp_path / "b", [{**REC[0], "rollout_s": 9.0, "sync/gb_per_s": 2.0}], "x,1\n")
    compared, diffs = compare_runs(a, b)
    assert diffs == [] and compared == ["rl/metrics.jsonl", "eval/results.csv"]
    assert is_timing("train_s") and is_timing("wall_seconds") and is_timing("rollout/engine_s_max")
    assert not is_timing("loss") and not is_timing("heldout_stderr") and not is_timing("pad_frac")


def test_a_changed_value_key_or_file_fails(tmp_path):
    a = _run(tmp_path / "a", REC, "x,1\n")
    b = _run(tmp_path / "b", [{**REC[0], "loss": 0.5000001}], "x,2\n")
    c = _run(tmp_path / "c", [{"step": 1, "loss": 0.5}], "x,1\n")
    _, diffs = compare_runs(a, b)
    assert any("loss 0.5 != 0.5000001" in d for d in diffs) and any("results.csv" in d for d in diffs)
    assert compare_runs(a, b, tol=1e-6)[1] == ["eval/results.csv: differs (or is missing on one side)"]
    assert any("keys differ" in d for d in compare_runs(a, c)[1])


def test_cli_exit_status(tmp_path):
    a = _run(tmp_path / "a", REC)
    b = _run(tmp_path / "b", [{**REC[0], "loss": 1.0}])
    tool = [sys.executable, str(ROOT / "tools" / "compare_runs.py")]
    ok = subprocess.run([*tool, str(a), str(a)], capture_output=True, text=True, check=False)
    bad = subprocess.run([*tool, str(a), str(b)], capture_output=True, text=True, check=False)
    missing = subprocess.run(
        [*tool, str(a), str(tmp_path / "nope")], capture_output=True, text=True, check=False
    )
    assert (ok.returncode, bad.returncode, missing.returncode) == (0, 1, 2)
    assert "1 difference(s)" in bad.stdout and "no such folder" in missing.stderr
