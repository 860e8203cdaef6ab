"""bench/ablations.py's plumbing: two variants (t1, no_entropy), one RL step each from one shared SFT of
the quick demo, then the report: per-step curves from the RL metrics (entropy, detector rates, greedy
and sampled validation accuracy), the paired difference to t1 recomputed here from the two runs'
responses, the scaling slopes, the plots, and a rerun that reuses the finished runs. Accuracy is not
asserted (one step of a 20-step SFT); the real ablations are in bench/RESULTS.md."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import numpy as np
import pytest

from tests.e2e.proc import ROOT, run_cli

pytestmark = pytest.mark.slow


def _module():
    spec = importlib.util.spec_from_file_location("ablations", ROOT / "bench" / "ablations.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "bench"))
    spec.loader.exec_module(mod)
    return mod


def test_doubling_slope_matches_a_least_squares_fit():
    mod = _module()
    budgets = [16, 32, 64, 128, 256]
    acc = [0.076, 0.07, 0.223, 0.564, 0.579]
    want = np.polyfit(np.log2(np.array(budgets, dtype=np.float64)), np.array(acc, dtype=np.float64), 1)[0]
    assert mod.doubling_slope(budgets, acc) == pytest.approx(want, rel=1e-12)
    assert mod.doubling_slope([16, 32], [0.1, 0.3]) == pytest.approx(0.2)
    assert math.isnan(mod.doubling_slope([64], [0.5]))


def test_variant_spec_is_checked():
    mod = _module()
    assert mod.parse_variant("hot:rollout.temperature=1.2,optim.lr=2e-5") == (
        "hot",
        ["rollout.temperature=1.2", "optim.lr=2e-5"],
    )
    for bad in ("hot", "hot:", ":a=1", "hot:temperature"):
        with pytest.raises(SystemExit, match="NAME:KEY=VALUE"):
            mod.parse_variant(bad)


def test_two_variants_one_step_each(tmp_path):
    out = tmp_path / "abl"
    cmd = [sys.executable, str(ROOT / "bench" / "ablations.py"), "--quick", "--seeds", "3"]
    cmd += ["--variants", "t1,no_entropy", "--out", str(out), "--rl-set", "run.train_steps=1"]
    cmd += ["--heldout", "40", "--sampled", "8", "--jobs", "1"]
    r = run_cli(cmd, timeout=420)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "ablations.json").read_text())
    assert list(rep["table"]) == ["t1", "no_entropy"]
    # the variant's override reached its RL run, the baseline's did not
    assert "entropy_coef: 0.0" in (out / "no_entropy_s3" / "rl" / "config.yaml").read_text()
    assert "entropy_coef: 0.001" in (out / "t1_s3" / "rl" / "config.yaml").read_text()
    # one SFT, shared: the copy's checkpoint is byte-identical and the SFT accuracy the same
    a, b = (out / f"{v}_s3" / "sft_hf" / "model-00001-of-00001.safetensors" for v in ("t1", "no_entropy"))
    assert a.read_bytes() == b.read_bytes()
    runs = rep["runs"]
    assert runs["t1"]["3"]["sft_accuracy"] == runs["no_entropy"]["3"]["sft_accuracy"]
    for v in ("t1", "no_entropy"):
        steps = runs[v]["3"]["steps"]
        assert set(steps["entropy"]) == {"1"} and steps["entropy"]["1"] > 0
        assert set(steps["repetition_rate"]) == {"1"} and 0 <= steps["repetition_rate"]["1"] <= 1
        assert set(steps["greedy"]) == {"0", "1"} and set(steps["sampled"]) == {"0", "1"}
        assert math.isfinite(runs[v]["3"]["slope"]) and math.isfinite(runs[v]["3"]["sft_slope"])
    # the paired difference, recomputed plainly from the two evaluations' per-problem answers
    scores = {}
    for v in ("t1", "no_entropy"):
        rows = [json.loads(line) for line in (out / f"{v}_s3" / "eval" / "responses.jsonl").open()]
        scores[v] = {x["problem_id"]: float(x["correct"]) for x in rows if x["checkpoint"] == "rl"}
    assert len(scores["t1"]) == 40 and scores["t1"].keys() == scores["no_entropy"].keys()
    d = np.array([scores["no_entropy"][k] - scores["t1"][k] for k in scores["t1"]], dtype=np.float64)
    nd = runs["no_entropy"]["3"]
    assert nd["vs_t1"] == pytest.approx(d.mean(), abs=1e-12)
    assert nd["vs_t1_stderr"] == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)), abs=1e-12)
    for name in ("entropy", "length", "accuracy", "scaling"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| no_entropy |" in (out / "ablations.md").read_text()

    # resumable: a rerun finds both runs finished and only rebuilds the report
    stamp = (out / "t1_s3" / "summary.json").stat().st_mtime_ns
    r2 = run_cli(cmd, timeout=120)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert (out / "t1_s3" / "summary.json").stat().st_mtime_ns == stamp
    # and refuses to mix a finished run with other overrides under the same name
    r3 = run_cli([*cmd, "--rl-set", "loss.kl_coef=0"], timeout=120)
    assert r3.returncode != 0 and "other overrides" in r3.stderr
