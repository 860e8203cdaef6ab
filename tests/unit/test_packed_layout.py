"""Which packed layout reaches which core attention (the TE guard): a layout the attention cannot
keep documents apart in is a one-line ConfigError, at build time and per batch."""

from __future__ import annotations

import pytest

from megatron_t1.config import ConfigError, config_from_dict


def _cfg(**data):
    return config_from_dict({"data": data, "run": {"device": "cpu"}})


def test_table_of_attention_and_layout():
    from megatron_t1.mcore.model import check_packed_layout

    for kind, layout in [("te", "thd"), ("sdpa", "thd"), ("sdpa", "mask"), ("megatron", "mask")]:
        check_packed_layout(kind, layout)
    with pytest.raises(ConfigError, match="te core attention.*data.packing=thd") as e:
        check_packed_layout("te", "mask")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="megatron core attention.*model.core_attention=sdpa"):
        check_packed_layout("megatron", "thd")
    with pytest.raises(ValueError, match="unknown core attention 'flash'"):
        check_packed_layout("flash", "thd")


def test_run_layout_from_config(monkeypatch):
    from megatron_t1.mcore import model

    assert model.packed_layout(_cfg()) == "thd"
    assert model.packed_layout(_cfg(packing="mask")) == "mask"
    meg = config_from_dict({"model": {"core_attention": "megatron"}, "run": {"device": "cpu"}})
    assert model.packed_layout(meg) == "mask"  # auto follows the attention
    meg.data.packing = "thd"
    with pytest.raises(ConfigError, match="model.core_attention=sdpa"):
        model.packed_layout(meg)
    # with TransformerEngine the spec's causal mask type ignores a dense mask: THD only
    monkeypatch.setattr(model, "te_available", lambda: True)
    assert model.packed_layout(_cfg()) == "thd"
    with pytest.raises(ConfigError, match="'mask' layout would reach te core attention"):
        model.packed_layout(_cfg(packing="mask"))


def test_config_fields():
    with pytest.raises(ConfigError, match="data.packing"):
        _cfg(packing="bshd")
    with pytest.raises(ConfigError, match=r"data.seq_length \(50\) must be divisible by .* \(4\)"):
        config_from_dict(
            {
                "model": {"num_attention_heads": 4, "num_query_groups": 4, "ffn_hidden_size": 64},
                "parallel": {"tensor_model_parallel_size": 4, "sequence_parallel": True},
                "data": {"seq_length": 50},
                "run": {"device": "cpu"},
            }
        ).validate()
