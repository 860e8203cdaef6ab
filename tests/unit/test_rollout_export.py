"""Pure parts of the export (no process group): the bucket plan and the strided TP merge, which must
equal the converter's ``merge_tp`` for every rule (the 2-rank test checks the whole stream)."""

from __future__ import annotations

import pytest
import torch

from megatron_t1.config import config_from_dict
from megatron_t1.convert.sharding import merge_tp, split_tp


def _cfg(tied: bool = True, layers: int = 4):
    return config_from_dict(
        {
            "model": {
                "num_layers": layers,
                "hidden_size": 64,
                "ffn_hidden_size": 96,
                "num_attention_heads": 4,
                "num_query_groups": 2,
                "vocab_size": 500,
                "tie_word_embeddings": tied,
            },
            "data": {"seq_length": 16, "micro_batch_size": 1, "global_batch_size": 1},
        }
    )


@pytest.mark.parametrize("rule", ["column", "vocab", "row", "gated_column", "replicated"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_merge_gathered_equals_merge_tp(rule, tp):
    from megatron_t1.mcore.export import merge_gathered

    g = torch.Generator().manual_seed(tp)
    full = torch.randn(16, 12, generator=g) if rule != "column" else torch.randn(16, generator=g)
    shards = split_tp(full, rule, tp)
    dst = torch.empty_like(full)
    merge_gathered(dst, torch.stack(shards), rule, tp)
    assert torch.equal(dst, merge_tp(shards, rule))
    assert torch.equal(dst, full)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("tp,pp,vpp", [(1, 1, None), (2, 2, None), (2, 2, 2)])
def test_export_plan_covers_every_tensor_once_in_stage_buckets(tied, tp, pp, vpp):
    from megatron_t1.convert.registry import spec_for_arch
    from megatron_t1.convert.sharding import layer_range
    from megatron_t1.mcore.export import export_plan

    cfg = _cfg(tied)
    bucket_mb = 0.05
    plan = export_plan(cfg, tp=tp, pp=pp, vpp=vpp, bucket_mb=bucket_mb)
    names = [i.tm.mcore for b in plan for i in b.items]
    maps = spec_for_arch("qwen2").tensor_maps(cfg.model, tp=tp)
    assert names == [m.mcore for m in maps]  # checkpoint order, nothing twice
    assert ("output_layer.weight" in names) == (not tied)
    for b in plan:
        assert all(i.pp_rank == b.pp_rank for i in b.items)
        assert len(b.items) == 1 or b.full_numel * 4 <= bucket_mb * 2**20
        for i in b.items:
            if i.tm.layer is not None:
                assert i.tm.layer in layer_range(4, pp, i.pp_rank, vpp, i.vp_stage if vpp else None)
            n_local = torch.Size(i.local_shape).numel()
            assert n_local * (tp if i.gathered else 1) == torch.Size(i.tm.shape).numel()
    assert plan[0].items[0].tm.mcore == "embedding.word_embeddings.weight" and plan[0].pp_rank == 0
    assert plan[-1].pp_rank == pp - 1


def test_hf_tensor_names_announce_the_stream():
    from megatron_t1.mcore.export import hf_tensor_names

    cfg = _cfg(tied=True, layers=2)
    names = hf_tensor_names(cfg, include_tied_lm_head=True)
    d = dict(names)
    assert d["model.embed_tokens.weight"] == (500, 64) == d["lm_head.weight"]  # padding stripped
    assert d["model.layers.1.self_attn.k_proj.weight"] == (32, 64)  # 2 groups x head dim 16
    assert d["model.layers.0.mlp.gate_proj.weight"] == (96, 64)
    assert [n for n, _ in names].index("lm_head.weight") == 1  # right after the embedding
    assert len(names) == len(set(d)) == 1 + 1 + 2 * 12 + 1
    assert "lm_head.weight" not in dict(hf_tensor_names(cfg))
