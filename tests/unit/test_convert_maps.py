"""Pure HF <-> Megatron maps: layouts against plainly written references, TP/PP sharding, streams.

No transformers, no megatron: tensors are random, references are loops over heads and ranks.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from megatron_t1.config import ModelConfig
from megatron_t1.convert import maps as M
from megatron_t1.convert.registry import SPECS, spec_for_arch, spec_for_hf_architectures
from megatron_t1.convert.sharding import (
    check_layout,
    layer_offset,
    layer_range,
    merge_tp,
    shard_tp,
    shift_expert,
    shift_layer,
    split_tp,
    tp_rule,
)


def _mc(arch: str = "qwen2", **kw) -> ModelConfig:
    base = dict(
        arch=arch,
        num_layers=2,
        hidden_size=16,
        ffn_hidden_size=12,
        num_attention_heads=8,
        num_query_groups=2,
        kv_channels=4,
        vocab_size=50,
        make_vocab_size_divisible_by=8,
        add_qkv_bias=arch not in ("llama", "qwen3", "qwen3_moe"),
        qk_layernorm=arch in ("qwen3", "qwen3_moe"),
        tie_word_embeddings=arch == "llama",
        rotary_percent=0.5 if arch == "glm" else 1.0,
    )
    if arch == "qwen3_moe":
        base.update(num_experts=3, moe_router_topk=2, moe_ffn_hidden_size=6, norm_topk_prob=False)
    base.update(kw)
    return ModelConfig(**base)


def _qkv_reference(q, k, v, heads, groups, d):
    """Megatron's order written out: for each group, its query heads, then its key, then its value."""
    per = heads // groups
    rows = []
    for g in range(groups):
        for h in range(g * per, (g + 1) * per):
            rows.append(q[h * d : (h + 1) * d])
        rows.append(k[g * d : (g + 1) * d])
        rows.append(v[g * d : (g + 1) * d])
    return torch.cat(rows)


def test_converters_never_import_megatron():
    code = (
        "import sys; sys.modules['megatron'] = None; sys.modules['vllm'] = None\n"
        "import megatron_t1.convert, megatron_t1.convert.offline, megatron_t1.convert.torch_dist\n"
        "import megatron_t1.convert.hf_io, megatron_t1.convert.glm, megatron_t1.convert.qwen3\n"
        "assert 'megatron.core' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("heads,groups", [(8, 2), (4, 4), (6, 1), (8, 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_merge_matches_reference_and_inverts(heads, groups, bias):
    d, hidden = 3, 5
    g = torch.Generator().manual_seed(heads * 10 + groups)
    shape = () if bias else (hidden,)
    q = torch.randn(heads * d, *shape, generator=g, dtype=torch.float64)
    k = torch.randn(groups * d, *shape, generator=g, dtype=torch.float64)
    v = torch.randn(groups * d, *shape, generator=g, dtype=torch.float64)
    merged = M.merge_qkv(q, k, v, heads=heads, groups=groups, head_dim=d)
    assert torch.equal(merged, _qkv_reference(q, k, v, heads, groups, d))
    q2, k2, v2 = M.split_qkv(merged, heads=heads, groups=groups, head_dim=d)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_qkv_tp_shard_holds_its_own_groups():
    """Rank r of TP=t must hold exactly the merged QKV of its own query heads and KV groups."""
    heads, groups, d, hidden, tp = 8, 4, 2, 6, 2
    q, k, v = (torch.randn(n * d, hidden) for n in (heads, groups, groups))
    full = M.merge_qkv(q, k, v, heads=heads, groups=groups, head_dim=d)
    hp, gp = heads // tp, groups // tp
    for r in range(tp):
        ref = M.merge_qkv(
            q[r * hp * d : (r + 1) * hp * d],
            k[r * gp * d : (r + 1) * gp * d],
            v[r * gp * d : (r + 1) * gp * d],
            heads=hp,
            groups=gp,
            head_dim=d,
        )
        assert torch.equal(shard_tp(full, "column", tp, r), ref)


def test_gated_fc1_split_per_rank_is_gate_and_up_shards():
    F, H, tp = 8, 3, 4
    gate, up = torch.randn(F, H), torch.randn(F, H)
    full = torch.cat([gate, up])
    shards = split_tp(full, "gated_column", tp)
    step = F // tp
    for r, s in enumerate(shards):
        assert torch.equal(s, torch.cat([gate[r * step : (r + 1) * step], up[r * step : (r + 1) * step]]))
    assert torch.equal(merge_tp(shards, "gated_column"), full)
    # the classic bug: a plain row split gives rank 0 only gate rows
    assert not torch.equal(split_tp(full, "column", tp)[0], shards[0])


@pytest.mark.parametrize("rule", ["replicated", "column", "row", "gated_column", "vocab"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_split_merge_round_trip(rule, tp):
    full = torch.randn(16, 8)
    shards = split_tp(full, rule, tp)
    assert len(shards) == tp
    if rule == "row":
        assert all(s.shape == (16, 8 // tp) for s in shards)
    assert torch.equal(merge_tp(shards, rule), full)


def test_tp_rules_by_name():
    assert tp_rule("decoder.layers.3.self_attention.linear_qkv.weight") == "column"
    assert tp_rule("decoder.layers.3.self_attention.linear_proj.weight") == "row"
    assert tp_rule("decoder.layers.3.mlp.linear_fc1.weight") == "gated_column"
    assert tp_rule("decoder.layers.3.mlp.linear_fc1.weight", gated=False) == "column"
    assert tp_rule("decoder.layers.0.input_layernorm.weight") == "replicated"
    assert tp_rule("decoder.layers.0.self_attention.q_layernorm.weight") == "replicated"
    assert tp_rule("embedding.word_embeddings.weight") == "vocab"
    with pytest.raises(M.ConvertError, match="no tensor-parallel rule"):
        tp_rule("decoder.layers.0.mystery.weight")
    with pytest.raises(M.ConvertError, match="not divisible"):
        split_tp(torch.randn(6, 2), "column", 4, name="x")


@pytest.mark.parametrize("pp,vpp", [(1, None), (2, None), (4, None), (2, 2), (2, 4)])
def test_pp_layer_ranges_partition_in_megatron_order(pp, vpp):
    L = 16
    # Megatron's order: virtual stage outer, pipeline rank inner (interleaved schedule).
    expected, nxt = {}, 0
    per = L // (pp * (vpp or 1))
    for vp in range(vpp or 1):
        for r in range(pp):
            expected[(r, vp)] = list(range(nxt, nxt + per))
            nxt += per
    for (r, vp), layers in expected.items():
        assert list(layer_range(L, pp, r, vpp, vp if vpp else None)) == layers
        assert layer_offset(L, pp, r, vpp, vp if vpp else None) == layers[0]
    with pytest.raises(M.ConvertError):
        layer_offset(10, 4, 0)


def test_shift_layer_names():
    assert (
        shift_layer("decoder.layers.1.mlp.linear_fc2.weight", 6) == "decoder.layers.7.mlp.linear_fc2.weight"
    )
    assert shift_layer("module.decoder.layers.0.x", 2) == "module.decoder.layers.2.x"
    assert shift_layer("embedding.word_embeddings.weight", 3) == "embedding.word_embeddings.weight"
    # EP rank 1 of 2 with 4 experts holds global experts 2, 3 as local 0, 1
    name = "decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"
    assert shift_expert(name, 2) == "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"
    assert shift_expert("decoder.layers.1.mlp.router.weight", 2) == "decoder.layers.1.mlp.router.weight"


def test_grouped_expert_names_are_renamed_to_sequential_ones():
    """TEGroupedMLP keeps local expert e as ``weight{e}`` / ``bias{e}`` of its grouped linears
    (megatron-core 0.16.1 ``TEGroupedLinear``); the maps know SequentialMLP's names only."""
    from megatron_t1.convert.sharding import sequential_expert_name
    from megatron_t1.mcore.convert_io import global_map_name

    g = "decoder.layers.1.mlp.experts."
    assert sequential_expert_name(g + "linear_fc1.weight3") == g + "local_experts.3.linear_fc1.weight"
    assert sequential_expert_name(g + "linear_fc2.weight12") == g + "local_experts.12.linear_fc2.weight"
    assert sequential_expert_name(g + "linear_fc2.bias0") == g + "local_experts.0.linear_fc2.bias"
    for unchanged in (
        g + "local_experts.3.linear_fc1.weight",  # already sequential
        "decoder.layers.1.mlp.linear_fc1.weight",  # a dense MLP
        "decoder.layers.1.mlp.router.weight",
        g + "linear_fc1._extra_state",
    ):
        assert sequential_expert_name(unchanged) == unchanged
    # PP chunk starting at layer 4, EP rank holding global experts 8.. : both offsets apply after renaming
    assert global_map_name(g + "linear_fc1.weight3", 4, 8) == (
        "decoder.layers.5.mlp.experts.local_experts.11.linear_fc1.weight"
    )
    assert global_map_name(g + "local_experts.3.linear_fc1.weight", 4, 8) == global_map_name(
        g + "linear_fc1.weight3", 4, 8
    )
    # TE-spec norm names still go to the local spec's
    assert global_map_name("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", 2, 0) == (
        "decoder.layers.2.input_layernorm.weight"
    )


def _random_hf(spec, mc, d):
    g = torch.Generator().manual_seed(0)
    out = {}
    for tm in spec.tensor_maps(mc):
        for name, shape in zip(tm.hf, M.expected_hf_shapes(tm, d)):
            out[name] = torch.randn(shape, generator=g)
    return out


@pytest.mark.parametrize("arch", ["qwen2", "llama", "glm", "qwen3", "qwen3_moe"])
@pytest.mark.parametrize("tp", [1, 4])
def test_to_hf_from_hf_are_exact_inverses(arch, tp):
    spec, mc = spec_for_arch(arch), _mc(arch)
    d = M.Dims.of(mc, tp=tp)
    hf = _random_hf(spec, mc, d)
    maps = spec.tensor_maps(mc, tp=tp)
    assert {h for tm in maps for h in tm.hf} == set(hf)
    for tm in maps:
        full = M.from_hf(tm, [hf[h] for h in tm.hf], d)
        assert tuple(full.shape) == tm.shape
        back = dict(M.to_hf(tm, full, d))
        assert list(back) == list(tm.hf)
        for h in tm.hf:
            assert torch.equal(back[h], hf[h]), h
        if tm.kind == "vocab":
            assert full.shape[0] == mc.padded_vocab_size(tp) and not full[mc.vocab_size :].any()
        again = M.from_hf(tm, [t for _, t in M.to_hf(tm, full, d)], d)
        assert torch.equal(again, full)


@pytest.mark.parametrize("arch", ["qwen2", "glm", "qwen3", "qwen3_moe"])
def test_row_plans_equal_the_tensor_path(arch):
    """The byte-copy fast path (row plans) must build exactly what from_hf / to_hf build."""
    spec, mc = spec_for_arch(arch), _mc(arch)
    d = M.Dims.of(mc, tp=2)
    hf = _random_hf(spec, mc, d)
    for tm in spec.tensor_maps(mc, tp=2):
        parts = [hf[h] for h in tm.hf]
        rows = []
        for seg in M.from_hf_row_plan(tm, d):
            src = (
                torch.zeros(seg.rows, *tm.shape[1:])
                if seg.part < 0
                else parts[seg.part][seg.row : seg.row + seg.rows]
            )
            rows.append(src)
        full = M.from_hf(tm, parts, d)
        assert torch.equal(torch.cat(rows), full), tm.mcore
        assert M.from_hf_row_plan(tm, d) == M.from_hf_row_plan(tm, d, derive=True), tm.mcore
        plan = M.to_hf_row_plan(tm, d, full.shape[0])
        assert plan == M.to_hf_row_plan(tm, d, full.shape[0], derive=True), tm.mcore
        for name, segs in plan:
            got = torch.cat([full[s.row : s.row + s.rows] for s in segs])
            assert torch.equal(got, dict(M.to_hf(tm, full, d))[name]), name


def test_qwen3_moe_maps_name_every_expert_in_megatron_layout():
    """Router ``mlp.gate`` [E, H] -> ``mlp.router.weight`` (replicated); expert e's gate/up/down ->
    ``mlp.experts.local_experts.e.linear_fc1`` [gate_e; up_e] (gated column) / ``linear_fc2`` (row)."""
    spec, mc = spec_for_arch("qwen3_moe"), _mc("qwen3_moe")
    maps = {tm.mcore: tm for tm in spec.tensor_maps(mc)}
    router = maps["decoder.layers.1.mlp.router.weight"]
    assert router.hf == ("model.layers.1.mlp.gate.weight",) and router.shape == (3, 16)
    assert router.tp == "replicated"
    fc1 = maps["decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight"]
    assert fc1.hf == tuple(f"model.layers.1.mlp.experts.2.{x}_proj.weight" for x in ("gate", "up"))
    assert fc1.kind == "gated" and fc1.tp == "gated_column" and fc1.shape == (12, 16)
    fc2 = maps["decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"]
    assert fc2.hf == ("model.layers.0.mlp.experts.0.down_proj.weight",) and fc2.tp == "row"
    assert fc2.shape == (16, 6)
    assert not any(".mlp.linear_fc" in n for n in maps)  # no dense MLP left
    with pytest.raises(M.ConvertError, match="num_experts"):
        spec.tensor_maps(_mc("qwen3_moe", num_experts=None))
    with pytest.raises(M.ConvertError, match="no MoE layout"):
        spec_for_arch("qwen3").tensor_maps(_mc("qwen3", num_experts=3))


def test_shape_mismatch_names_the_hf_tensor():
    spec, mc = spec_for_arch("qwen2"), _mc()
    d = M.Dims.of(mc)
    tm = next(t for t in spec.tensor_maps(mc) if t.kind == "qkv")
    q, k, v = (torch.randn(s) for s in M.expected_hf_shapes(tm, d))
    with pytest.raises(M.ConvertError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        M.from_hf(tm, [q, k[:-1], v], d)


def test_streams_round_trip_in_any_order_and_report_missing():
    spec, mc = spec_for_arch("llama"), _mc("llama")
    d = M.Dims.of(mc)
    hf = _random_hf(spec, mc, d)
    items = list(hf.items())
    random.Random(0).shuffle(items)
    mcore = dict(
        M.iter_megatron_tensors_from_hf(items + [("model.layers.0.self_attn.rotary_emb.inv_freq", None)], mc)
    )
    assert set(mcore) == {tm.mcore for tm in spec.tensor_maps(mc)}
    # the last PP stage's copy of a tied embedding is skipped on the way out, as HF has no lm_head
    out = dict(M.iter_hf_tensors_from_megatron([*mcore.items(), ("output_layer.weight", torch.zeros(1))], mc))
    assert out.keys() == hf.keys() and all(torch.equal(out[k], hf[k]) for k in hf)
    with pytest.raises(M.ConvertError, match="missing HF tensors.*mlp.down_proj"):
        list(
            M.iter_megatron_tensors_from_hf(
                [(k, v) for k, v in items if "layers.1.mlp.down_proj" not in k], mc
            )
        )
    with pytest.raises(M.ConvertError, match="not part of LlamaForCausalLM"):
        list(M.iter_megatron_tensors_from_hf([("model.layers.0.mlp.extra.weight", torch.zeros(1))], mc))
    with pytest.raises(M.ConvertError, match="no HF counterpart"):
        list(M.iter_hf_tensors_from_megatron([("decoder.layers.9.foo.weight", torch.zeros(1))], mc))


def test_registry_dispatch_and_unknown_architecture():
    assert [s.hf_architecture for s in SPECS] == [
        "Qwen2ForCausalLM", "LlamaForCausalLM", "GlmForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"
    ]  # fmt: skip
    assert spec_for_hf_architectures(["GlmForCausalLM"]).name == "glm"
    assert spec_for_hf_architectures(["Qwen3ForCausalLM"]).name == "qwen3"
    assert spec_for_hf_architectures(["Qwen3MoeForCausalLM"]).name == "qwen3_moe"
    with pytest.raises(M.ConvertError, match=r"Glm4ForCausalLM.*supported.*Qwen2ForCausalLM"):
        spec_for_hf_architectures(["Glm4ForCausalLM"])
    with pytest.raises(M.ConvertError, match="unknown model.arch"):
        spec_for_arch("gpt2")


def test_layout_checks_name_what_does_not_divide():
    with pytest.raises(
        M.ConvertError, match="num_attention_heads=8 is not divisible by tensor parallel size 3"
    ):
        check_layout(_mc(), tp=3)
    with pytest.raises(
        M.ConvertError, match="num_query_groups.*=2 is not divisible by tensor parallel size 4"
    ):
        check_layout(_mc(), tp=4)
    with pytest.raises(M.ConvertError, match="num_layers=2 is not divisible by 4 pipeline stages"):
        check_layout(_mc(), pp=4)
    check_layout(_mc(), tp=2, pp=2)


def test_architecture_constraints():
    with pytest.raises(M.ConvertError, match="Qwen2ForCausalLM has a QKV bias"):
        spec_for_arch("qwen2").tensor_maps(_mc(add_qkv_bias=False))
    with pytest.raises(M.ConvertError, match="attention_bias == mlp_bias"):
        spec_for_arch("llama").tensor_maps(_mc("llama", add_qkv_bias=True))
    with pytest.raises(M.ConvertError, match="no bias outside QKV"):
        spec_for_arch("glm").tensor_maps(_mc("glm", add_bias_linear=True))
    with pytest.raises(M.ConvertError, match="Qwen3ForCausalLM has q/k norms and no bias"):
        spec_for_arch("qwen3").tensor_maps(_mc("qwen3", qk_layernorm=False))
    with pytest.raises(M.ConvertError, match="Qwen3ForCausalLM has q/k norms and no bias"):
        spec_for_arch("qwen3").tensor_maps(_mc("qwen3", add_qkv_bias=True))
    with pytest.raises(M.ConvertError, match="no q/k norm in HF"):
        spec_for_arch("qwen2").tensor_maps(_mc(qk_layernorm=True))
    # Qwen3's q/k norms: one [head_dim] weight each per layer, replicated over TP
    maps = spec_for_arch("qwen3").tensor_maps(_mc("qwen3"), tp=4)
    norms = [tm for tm in maps if tm.mcore.endswith(("q_layernorm.weight", "k_layernorm.weight"))]
    assert [(tm.mcore, tm.hf, tm.shape, tm.tp) for tm in norms if tm.layer == 1] == [
        ("decoder.layers.1.self_attention.q_layernorm.weight", ("model.layers.1.self_attn.q_norm.weight",),
         (4,), "replicated"),
        ("decoder.layers.1.self_attention.k_layernorm.weight", ("model.layers.1.self_attn.k_norm.weight",),
         (4,), "replicated"),
    ]  # fmt: skip
    # Llama with both biases maps o_proj and MLP biases too
    names = {
        h
        for tm in spec_for_arch("llama").tensor_maps(_mc("llama", add_qkv_bias=True, add_bias_linear=True))
        for h in tm.hf
    }
    assert {"model.layers.0.self_attn.o_proj.bias", "model.layers.1.mlp.up_proj.bias"} <= names


@pytest.mark.parametrize("arch", ["qwen2", "llama", "glm", "qwen3", "qwen3_moe"])
@pytest.mark.parametrize("kv_channels", [None, 4])
def test_hf_config_round_trips_through_model_config(arch, kv_channels, tmp_path):
    """ModelConfig -> the spec's config.json -> (transformers reads it) -> ModelConfig: the same model."""
    import json

    from transformers import AutoConfig

    from megatron_t1.convert.registry import model_config_from_hf_dir

    mc = _mc(arch, kv_channels=kv_channels, rope_theta=5e5, norm_epsilon=1e-5, max_position_embeddings=64)
    spec = spec_for_arch(arch)
    cfg = spec.hf_config(mc, "float32")
    assert cfg["architectures"] == [spec.hf_architecture]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = AutoConfig.from_pretrained(tmp_path)  # transformers accepts every key
    assert hf.num_key_value_heads == 2 and hf.hidden_size == 16
    got_spec, got, _ = model_config_from_hf_dir(tmp_path)
    assert got_spec is spec
    for field in (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
        "vocab_size", "add_qkv_bias", "add_bias_linear", "tie_word_embeddings", "rotary_percent",
        "rope_theta", "norm_epsilon", "max_position_embeddings", "qk_layernorm", "num_experts",
        "moe_router_topk", "moe_ffn_hidden_size", "norm_topk_prob", "moe_aux_loss_coeff",
    ):  # fmt: skip
        assert getattr(got, field) == getattr(mc, field), field
    head_dim = kv_channels or mc.hidden_size // mc.num_attention_heads
    assert (got.kv_channels or got.hidden_size // got.num_attention_heads) == head_dim
