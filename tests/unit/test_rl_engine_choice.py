"""train.rl._make_engine: which rollout engine the loop builds, and the placements it refuses."""

from __future__ import annotations

import pytest
import torch

from megatron_t1.config import ConfigError, config_from_dict

MODEL = dict(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, vocab_size=64)


def test_hf_engine_has_the_policy_shape_on_the_trainer_device(tmp_path):
    from megatron_t1.rollout.hf_engine import HFEngine
    from megatron_t1.train.rl import _make_engine

    class Tok:
        eos_token_id, pad_token_id = 1, 0

    eng = _make_engine(config_from_dict({"model": MODEL}), Tok(), torch.device("cpu"), tmp_path)
    assert isinstance(eng, HFEngine) and eng.device.type == "cpu"
    assert eng.model.get_input_embeddings().weight.shape == (64, 32)


@pytest.mark.parametrize(
    "rollout, field",
    [
        ({"engines_per_node": 2}, "engines_per_node"),
        ({"vllm_tensor_parallel_size": 4}, "vllm_tensor_parallel_size"),
        ({"vllm_mode": "server", "server_urls": ["http://a:1", "http://b:1"]}, "server_urls"),
    ],
)
def test_vllm_placements_the_loop_does_not_drive_are_refused_by_name(tmp_path, rollout, field):
    from megatron_t1.train.rl import _make_engine

    cfg = config_from_dict({"model": MODEL, "rollout": {"engine": "vllm", **rollout}})
    with pytest.raises(ConfigError, match=field):
        _make_engine(cfg, None, torch.device("cpu"), tmp_path)
    assert not (tmp_path / "rollout_model").exists()  # nothing written before the refusal
