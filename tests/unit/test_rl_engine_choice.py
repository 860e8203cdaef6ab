"""DistributedRollout.build in a world of one: which rollout engine the RL loop builds, and the
settings it refuses before any engine starts (multi-rank placements: tests/dist/test_rollout_dist.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_t1.config import ConfigError, config_from_dict

MODEL = dict(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, vocab_size=64)


class Tok:
    eos_token_id, pad_token_id = 1, 0


def _build(cfg, tmp_path: Path):
    from megatron_t1.rollout.distributed import DistributedRollout

    return DistributedRollout.build(
        cfg, Tok(), rank=0, world_size=1, ranks_per_node=1, device=torch.device("cpu"), run_dir=tmp_path
    )


def test_hf_engine_has_the_policy_shape_on_the_trainer_device(tmp_path):
    from megatron_t1.rollout.hf_engine import HFEngine

    state = torch.get_rng_state()
    r = _build(config_from_dict({"model": MODEL, "rollout": {"prompts_per_step": 2}}), tmp_path)
    assert torch.equal(state, torch.get_rng_state())  # random start weights leave the trainer's RNG alone
    assert isinstance(r.engine, HFEngine) and r.engine.device.type == "cpu"
    assert r.engine.model.get_input_embeddings().weight.shape == (64, 32)
    assert r.placement.num_engines == 1 and r.units == [("engine 0 (rank 0, node 0)", r.engine)]
    r.close()


def test_server_mode_needs_urls():
    with pytest.raises(ConfigError, match="server_urls"):
        config_from_dict({"model": MODEL, "rollout": {"engine": "vllm", "vllm_mode": "server"}})


@pytest.mark.parametrize(
    "rollout, words",
    [
        ({"engines_per_node": 2}, ["engines_per_node=2", "vllm_tensor_parallel_size=1", "node, 1"]),
        ({"vllm_tensor_parallel_size": 4}, ["vllm_tensor_parallel_size=4", "1 ranks"]),
    ],
)
def test_placements_that_do_not_fit_the_job_are_refused_by_name(tmp_path, rollout, words):
    cfg = config_from_dict({"model": MODEL, "rollout": {"engine": "vllm", **rollout}})
    with pytest.raises(ConfigError) as e:
        _build(cfg, tmp_path)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not (tmp_path / "rollout_model").exists()  # nothing written before the refusal
