"""`python -m megatron_t1 demo --quick`: the whole pipeline on a fresh folder (data, tokenizer, SFT,
RL at TP=1 then resumed at TP=2 under torchrun with a validation evaluation every step, the best
checkpoint selected, HF exports, evaluation of both policies, the scaling sweep and its PNG) writes a
summary a script can check. Accuracy is not asserted here (a few steps);
the full demo's numbers are in bench/RESULTS.md."""

from __future__ import annotations

import json
import math
import sys

import pytest

from tests.e2e.proc import run_cli

pytestmark = pytest.mark.slow


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = run_cli([sys.executable, "-m", "megatron_t1", "demo", "--quick", "--out", str(out)], timeout=420)
    assert r.returncode == 0, r.stderr[-4000:]
    s = json.loads((out / "summary.json").read_text())
    for key in ("sft_accuracy", "rl_accuracy", "heldout_size", "wall_seconds"):
        assert key in s, key
    assert s["heldout_size"] == 100
    assert 0.0 <= s["sft_accuracy"] <= 1.0 and 0.0 <= s["rl_accuracy"] <= 1.0
    assert s["rl_tp2_steps"] >= 1
    # the RL run really went through TP=2: its last steps' config and metrics say so
    cfg = (out / "rl" / "config.yaml").read_text()
    assert "tensor_model_parallel_size: 2" in cfg
    steps = [json.loads(line)["step"] for line in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, s["rl_steps"] + 1))  # no step lost or repeated across the TP change
    assert (out / "rl" / "hf" / "config.json").is_file() and (out / "sft_hf" / "config.json").is_file()
    png = out / "eval" / "scaling.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    budgets = sorted({row["budget"] for row in s["scaling"]})
    assert budgets and {row["checkpoint"] for row in s["scaling"]} == {"sft", "rl"}
    assert all(math.isfinite(row["accuracy"]) for row in s["scaling"])
    assert s["scaling_problems"] == 100 and all(row["num_problems"] == 100 for row in s["scaling"])
    assert "held-out accuracy" in r.stdout
    # model selection: validated at every step across the TP change, the evaluated RL policy is the
    # step the trainer marked best, exported as hf_best
    assert s["rl_select"] == "best" and s["validation_size"] == 16
    curve = {int(k): v for k, v in s["rl_validation_accuracy"].items()}
    assert sorted(curve) == list(range(1, s["rl_steps"] + 1))
    assert s["rl_selected_step"] == max(curve, key=lambda k: (curve[k], k))
    marker = (out / "rl" / "checkpoints" / "best").read_text().strip()
    assert marker == f"step_{s['rl_selected_step']:07d}"
    assert (out / "rl" / "hf_best" / "config.json").is_file()
