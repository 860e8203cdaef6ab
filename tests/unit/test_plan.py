"""The memory planner against published Megatron figures, hand-computed 32B numbers, and its CLI.

References written out plainly here: Korthikanti et al. 2022 (arXiv 2205.05198) Table 2 activation
formulas; Megatron-Core's distributed-optimizer bytes-per-parameter table; Megatron-LM's
theoretical_memory_usage.py parameter formula; Narayanan et al. 2021's GPT parameter count; the
Qwen2.5-7B and GLM-4-9B model cards; transformers' own parameter count of Qwen3-8B and
Qwen3-30B-A3B (built on the meta device); megatron-core 0.16.1's MoE layout (expert-DP = DP / EP).
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_t1.config import load_config
from megatron_t1.plan import (
    GIB,
    VLLM_ASLEEP_GIB,
    VLLM_OVERHEAD_GIB,
    PlanInputs,
    count_parameters,
    inputs_from_config,
    kv_bytes_per_token,
    layer_activation_bytes,
    moe_saved_per_token,
    optimizer_bytes_per_param,
    plan_memory,
    plan_to_dict,
    rank_parameter_split,
    rank_parameters,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*/*.yaml"))
EXAMPLE_NODES = {"qwen2.5_32b/sft": 4, "qwen2.5_32b/rl": 4, "qwen3_30b_a3b/sft": 2, "qwen3_30b_a3b/rl": 4}
"""The 8-GPU nodes each example is planned for (the others: one)."""


def _gpt3(**kw) -> dict:
    """GPT-3 175B layer (Korthikanti et al. Table 3): a=96, h=12288, s=2048, GELU MLP of 4h, dropout."""
    base = dict(
        s=2048,
        b=1,
        h=12288,
        heads=96,
        q_width=12288,
        kv_width=12288,
        ffn=4 * 12288,
        swiglu=False,
        attention="unfused",
        hidden_dropout=True,
        attention_dropout=True,
        softmax_fp32=False,
        rope_copies=False,
    )
    return base | kw


# ---- published figures ---------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 2, 8])
def test_activations_reduce_to_korthikanti_table2(t):
    s, b, h, a = 2048, 1, 12288, 96
    sbh = s * b * h
    no_sp = sbh * (10 + 24 / t + 5 * a * s / (h * t))
    with_sp = sbh / t * (34 + 5 * a * s / h)
    assert layer_activation_bytes(**_gpt3(tp=t, sp=False)) == pytest.approx(no_sp, rel=1e-12)
    assert layer_activation_bytes(**_gpt3(tp=t, sp=True)) == pytest.approx(with_sp, rel=1e-12)
    assert layer_activation_bytes(**_gpt3(tp=t, sp=True, recompute="selective")) == pytest.approx(
        34 * sbh / t, rel=1e-12
    )
    assert layer_activation_bytes(**_gpt3(tp=t, sp=True, recompute="full")) == 2 * sbh / t
    assert layer_activation_bytes(**_gpt3(tp=t, sp=False, recompute="full")) == 2 * sbh
    if t == 1:  # no parallelism: s*b*h*(34 + 5as/h)
        assert layer_activation_bytes(**_gpt3()) == pytest.approx(sbh * (34 + 5 * a * s / h), rel=1e-12)


def test_megatron_estimator_selective_sp_formula():
    # megatron/training/theoretical_memory_usage.py: s*b*h*(18 + 4*f/h) per layer / t (selective + SP)
    s, b, h, f, t = 4096, 2, 8192, 4 * 8192, 8
    ours = layer_activation_bytes(
        **_gpt3(s=s, b=b, h=h, heads=64, q_width=h, kv_width=h, ffn=f, tp=t, sp=True, recompute="selective")
    )
    assert ours == pytest.approx(s * b * h * (18 + 4 * f / h) / t, rel=1e-12)


def test_optimizer_bytes_match_megatron_table():
    for d in (1, 2, 8, 64):
        bf16 = optimizer_bytes_per_param("bf16", True, d)
        assert sum(bf16.values()) == pytest.approx(6 + 12 / d)
        fp32 = optimizer_bytes_per_param("fp32", True, d)
        assert sum(fp32.values()) == pytest.approx(8 + 8 / d)
    assert sum(optimizer_bytes_per_param("bf16", False, 8).values()) == 18
    assert sum(optimizer_bytes_per_param("fp32", False, 8).values()) == 16


def _shape(path: str, **kw) -> PlanInputs:
    return inputs_from_config(load_config(ROOT / path), nodes=kw.pop("nodes", 4), **kw)


def test_parameter_counts_match_published_sizes():
    q7 = count_parameters(_shape("examples/qwen2.5_7b/rl.yaml", nodes=1), padded=False)
    assert round(q7.total / 1e9, 2) == 7.62 and round(q7.total / 1e9, 1) == 7.6  # card: 7.61B
    assert round(q7.non_embedding / 1e9, 2) == 6.53  # card: 6.53B non-embedding
    glm = count_parameters(_shape("examples/glm4_9b/rl.yaml", nodes=1), padded=False)
    assert round(glm.total / 1e9, 2) == 9.40
    # GPT-3 175B, Narayanan et al. 2021: P = 12 l h^2 (1 + 13/(12h) + (V + s)/(12 l h)), V=51200, s=2048;
    # our count has no learned positions (RoPE models) and adds the final LayerNorm (2h).
    l_, h, v, s = 96, 12288, 51200, 2048
    gpt3 = PlanInputs(
        num_layers=l_,
        hidden=h,
        ffn=4 * h,
        heads=96,
        groups=96,
        head_dim=128,
        vocab=v,
        swiglu=False,
        qkv_bias=True,
        linear_bias=True,
        layernorm=True,
        tied=True,
    )
    narayanan = 12 * l_ * h**2 * (1 + 13 / (12 * h) + (v + s) / (12 * l_ * h))
    assert count_parameters(gpt3, padded=False).total + s * h - 2 * h == pytest.approx(narayanan, rel=1e-12)
    assert round(narayanan / 1e9, 1) == 174.6


def test_parameter_count_is_megatron_formula_plus_qkv_bias():
    x = _shape("examples/qwen2.5_32b/rl.yaml")
    h, L, a, g, f = x.hidden, x.num_layers, x.heads, x.groups, x.ffn
    q = a * x.head_dim
    # theoretical_memory_usage.py (no biases): 2h^2 (1 + g/a) q/h + 2h (f * 3/2 + 1) per layer
    per_layer = 2 * h * h * (1 + g / a) * (q / h) + 2 * h * (f * 1.5 + 1)
    megatron = per_layer * L + h + 2 * h * x.vocab_padded
    qkv_bias = L * (q + 2 * g * x.head_dim)
    assert count_parameters(x).total - qkv_bias == pytest.approx(megatron, rel=1e-12)


# ---- the 32B RL config, by hand ------------------------------------------------------------------


def test_qwen32b_rl_plan_by_hand():
    x = _shape("examples/qwen2.5_32b/rl.yaml", gpus_per_node=8, gpu_mem_gib=80)
    h, f, L, V, t, pp, dp = 5120, 27648, 64, 152064, 8, 2, 2
    q, kv, s = 5120, 1024, 17408
    assert (x.tp, x.pp, x.dp, x.sp, x.recompute, x.mode) == (t, pp, dp, True, "full", "rl")
    v_pad = -(-V // (128 * t)) * 128 * t
    assert v_pad == 152576
    sharded = h * (q + 2 * kv) + q * h + 3 * h * f + (q + 2 * kv)
    n0 = 32 * (sharded / t + 2 * h) + v_pad * h / t
    n1 = 32 * (sharded / t + 2 * h) + h + v_pad * h / t
    assert rank_parameters(x, 0) == pytest.approx(n0) and rank_parameters(x, 1) == pytest.approx(n1)
    assert round(n0 / 1e9, 3) == 2.048

    stored = 2 * s * h / t  # full recompute: the layer input, split by SP
    # One layer's activations (the recompute working set). Since the planner counts what autograd was
    # seen to save (tests/unit/test_plan_measured.py): the unfused SwiGLU's silu(gate) and its
    # ``x_linear + glu_linear_offset`` copy (2 x 2 * f), and the unfused RoPE's cos and sin for Q and K
    # (4 x 2 B x head_dim on every TP rank: not split).
    per_token_work = (
        4 * 2 * h + 2 * (q + 2 * kv) + 2 * q + 2 * 2 * f + 2 * f + 2 * 2 * f + 2 * (q + kv) + 4 * 40
    ) / t + 4 * 2 * 128
    work = per_token_work * s
    gib = GIB
    fixed = 3 * gib + VLLM_ASLEEP_GIB * gib
    m = 32 * 64 // dp  # micro-batches per step and DP rank: 32 prompts x 64 kept responses, one row each
    step_tokens = m * s
    held = 16 * step_tokens  # last stage, anchor pass only: policy + anchor log-probs, entropies (fp32)
    mb = 56 * s  # a training micro-batch: 5 int64 + 4 fp32 [tokens] tensors (THD: no mask)
    # The fused output layer (loss.fused_output_layer, SP): two fp32 4096 x 4096 tiles, fp32 gradient
    # accumulators of the hidden states [s, h] and of the weight shard [V/t, h], and the fused function
    # saves the sequence-gathered hidden states [s, h] beside the final norm's input [s/t, h].
    tiles = 2 * 4 * 4096 * 4096
    fused = tiles + 4 * (s + v_pad // t) * h
    final = 2 * s * h / t + 2 * s * h
    stage0 = 16 * n0 + stored * 32 * 2 + work + 2 * mb + fixed  # 2 + 4 + 12 / DP 2 + 4 (fp32 anchor) B
    stage1 = 16 * n1 + stored * 32 * 1 + work + mb + final + fused + fixed
    plan = plan_memory(x)
    train = plan.phases[0]
    assert plan.stage == (0 if stage0 > stage1 else 1) == 1
    assert train.total == pytest.approx(max(stage0, stage1), rel=1e-12)
    assert train.get("optimizer states") == pytest.approx(6 * (n0 if plan.stage == 0 else n1))
    assert train.get("anchor") == pytest.approx(4 * (n0 if plan.stage == 0 else n1))
    assert train.get("logits") == pytest.approx(fused)

    # Anchor log-probs (last stage): the fp32 EMA anchor's bf16 copy swapped into the policy's modules
    # (2 B x params), one log-prob micro-batch (5 int64 + 2 fp32), the stage input [s/t, h] + one
    # layer's live tensors without grad (its input, the post-attention residual, the MLP norm output
    # + its TP-gathered copy, and fc1 out 2f + silu f + the x_linear copy f + product f per TP rank,
    # larger than attention and than the output layer's [s, h] + tiles), the new log-probs beside
    # the policy pass's (16 B per step token for both).
    layer = (2 * h / t + 2 * h / t + (2 * h / t + 2 * h) + 2 * 5 * f / t) * s
    assert layer > 2 * s * h + tiles
    anchor = plan.phases[1]
    assert anchor.name == "anchor log-probs" and anchor.stage == 1
    assert anchor.get("anchor in policy dtype") == pytest.approx(2 * n1)
    expect = 16 * n1 + 2 * n1 + 48 * s + (2 * s * h / t + layer) + held + fixed
    assert anchor.total == pytest.approx(expect, rel=1e-12)

    total_params = L * (sharded + 2 * h) + h + 2 * V * h
    assert plan.params_total == total_params and round(total_params / 1e9, 2) == 32.76
    kv_tok = 2 * L * (8 / 4) * 128 * 2
    assert kv_bytes_per_token(x) == kv_tok == 64 * 1024
    kv_cache = 0.5 * 80 * gib - total_params * 2 / 4 - VLLM_OVERHEAD_GIB * gib
    assert [ph.name for ph in plan.phases] == ["train", "anchor log-probs", "weight sync", "rollout"]
    rollout = plan.phases[3]
    assert rollout.get("vLLM KV cache") == pytest.approx(kv_cache)
    assert plan.kv_concurrency == pytest.approx(kv_cache / (kv_tok * s))
    # The step's log-prob outputs are freed after the advantages (train/rl.py): not in the rollout.
    assert rollout.total == pytest.approx(16 * n1 + 3 * gib + 0.5 * 80 * gib)
    # Weight sync: the trainer's resident state, vLLM's woken weights and the export's two slots of
    # (full + gathered + packed / TP) buckets; the largest tensor (the padded embedding, bf16) makes
    # the bucket bigger than rollout.bucket_mb = 512 MiB.
    bucket = max(512 * 2**20, 2 * v_pad * h)
    assert bucket == 2 * v_pad * h
    sync = plan.phases[2]
    assert sync.get("export buckets") == pytest.approx(2 * bucket * (2 + 1 / t))
    assert sync.total == pytest.approx(16 * n1 + 3 * gib + total_params * 2 / 4 + 2 * bucket * (2 + 1 / t))
    assert plan.fits and plan.peak == max(ph.total for ph in plan.phases) == rollout.total


def test_every_example_loads_strictly_and_fits_its_cluster():
    names = {p.parent.name for p in EXAMPLES}
    assert {"qwen2.5_32b", "qwen2.5_7b", "glm4_9b", "qwen3_8b", "qwen3_30b_a3b"} <= names
    for path in EXAMPLES:
        cfg = load_config(path)  # unknown keys would raise
        if path.parent.name == "tiny_cpu":
            continue
        nodes = EXAMPLE_NODES.get(f"{path.parent.name}/{path.stem}", 1)
        x = inputs_from_config(cfg, nodes=nodes, gpus_per_node=8, gpu_mem_gib=79.6)
        plan = plan_memory(x)
        assert plan.fits, (path, plan.problems, plan.peak / GIB)
        if x.mode == "rl":
            assert x.engines_per_node * x.vllm_tp == 8 and plan.kv_concurrency >= 8, path


def test_examples_are_t1_settings():
    rl = load_config(ROOT / "examples/qwen2.5_32b/rl.yaml")
    assert (rl.rollout.n_samples, rl.rollout.temperature, rl.rollout.prompts_per_step) == (64, 1.2, 32)
    assert (rl.rollout.max_new_tokens, rl.optim.lr, rl.loss.kl_coef) == (16384, 1.5e-6, 2e-4)
    assert (rl.parallel.tp, rl.parallel.pp, rl.rollout.engine) == (8, 2, "vllm")
    sft = load_config(ROOT / "examples/qwen2.5_32b/sft.yaml")
    assert (sft.optim.lr, sft.optim.lr_decay_style) == (1e-5, "cosine")
    for name, groups in (("qwen2.5_7b", 4), ("glm4_9b", 2), ("qwen3_8b", 8), ("qwen3_30b_a3b", 4)):
        for kind in ("sft", "rl"):
            cfg = load_config(ROOT / f"examples/{name}/{kind}.yaml")
            assert cfg.model.query_groups == groups and cfg.parallel.tp <= groups
    glm = load_config(ROOT / "examples/glm4_9b/rl.yaml")
    assert (glm.model.arch, glm.model.rotary_percent, glm.model.add_qkv_bias) == ("glm", 0.5, True)
    for kind in ("sft", "rl"):
        q8 = load_config(ROOT / f"examples/qwen3_8b/{kind}.yaml").model
        assert (q8.arch, q8.qk_layernorm, q8.add_qkv_bias, q8.num_experts, q8.rope_theta) == (
            "qwen3",
            True,
            False,
            None,
            1e6,
        )
        moe = load_config(ROOT / f"examples/qwen3_30b_a3b/{kind}.yaml")
        m, p = moe.model, moe.parallel
        assert (m.arch, m.num_experts, m.moe_router_topk, m.expert_ffn, m.kv_channels) == (
            "qwen3_moe",
            128,
            8,
            768,
            128,
        )
        # Megatron trains MoE with TP only under SP; EP=8 of the DP ranks
        assert (p.ep, p.tp, p.sequence_parallel) == (8, 2, True)


# ---- behaviour -----------------------------------------------------------------------------------


def _rl7b(**kw) -> PlanInputs:
    return dataclasses.replace(_shape("examples/qwen2.5_7b/rl.yaml", nodes=1), **kw)


def test_packed_layout_counts_the_mask_only_for_the_mask_layout():
    x = _rl7b()
    assert (x.packing, x.layout) == ("auto", "thd")
    s, b, m = x.seq_length, x.micro_batch, 1  # PP=1: one micro-batch in flight
    thd = plan_memory(x).phases[0].get("micro-batch tensors")
    assert thd == (5 * 8 + 4 * 4) * s * b * m  # 5 int64 + 4 fp32 [tokens] tensors, no [S, S] anything
    mask = plan_memory(dataclasses.replace(x, packing="mask")).phases[0].get("micro-batch tensors")
    assert mask - thd == b * s * s  # the [b, 1, S, S] bool mask
    # auto picks the mask for Megatron's unfused attention, and THD there is refused
    assert dataclasses.replace(x, attention="unfused").layout == "mask"
    bad = plan_memory(dataclasses.replace(x, attention="unfused", packing="thd"))
    assert any("no THD path" in p for p in bad.problems) and not bad.fits
    # more fp32 fields: old_logprobs with several optimizer steps per batch
    x2 = dataclasses.replace(x, optim_steps_per_batch=2)
    assert plan_memory(x2).phases[0].get("micro-batch tensors") == thd + 4 * s * b


def test_rl_loss_temporaries_match_the_implementation():
    # examples/qwen2.5_7b: TP=4 with SP, bf16, 11264-token rows, fused output layer
    x = _rl7b()
    T, h, V = x.seq_length, x.hidden, x.vocab_padded // x.tp
    assert (x.tp, x.sp, x.fused_output_layer, V) == (4, True, True, 38016)
    train, anchor = plan_memory(x).phases[:2]
    # fused: two fp32 4096 x 4096 tiles + fp32 grad accumulators [T, h] and [V_local, h]
    assert train.get("logits") == 2 * 4 * 4096 * 4096 + 4 * (T + V) * h
    # ... and the SP-gathered [T, h] hidden it saves (not T / TP) beside the final norm input [T/TP, h]
    assert train.get("final norm + output input") == 2 * T * h / 4 + 2 * T * h
    # over logits: bf16 logits + their bf16 gradient + two fp32 chunks of 16M logits
    y = dataclasses.replace(x, fused_output_layer=False)
    rows = 2**24 // V
    assert plan_memory(y).phases[0].get("logits") == 2 * 2 * T * V + 2 * 4 * rows * V
    assert plan_memory(y).phases[0].get("final norm + output input") == 2 * 2 * T * h / 4
    # fp32 logits: the gradient chunk is used in place, one scratch chunk
    z = dataclasses.replace(y, precision="fp32")
    assert plan_memory(z).phases[0].get("logits") == 2 * 4 * T * V + 4 * rows * V
    # the log-prob pass: logits + two chunks, or the two tiles
    from megatron_t1.plan import logits_bytes

    assert logits_bytes(y, forward_only=True)[0] == 2 * T * V + 2 * 4 * rows * V
    assert logits_bytes(x, forward_only=True)[0] == 2 * 4 * 4096 * 4096
    assert anchor.get("forward working set") < train.get("activations")


def test_anchor_pass_counts_the_anchor_copy_only_when_it_is_cast_or_moved():
    x = _rl7b()
    n = rank_parameters(x, 0)

    def copy(**kw):
        ph = plan_memory(dataclasses.replace(x, **kw)).phases[1]
        assert ph.name == "anchor log-probs"
        return ph.get("anchor in policy dtype")

    assert copy() == 2 * n  # fp32 EMA under a bf16 policy: a bf16 copy for the pass
    assert copy(anchor="copy") == 0  # already bf16 on the GPU: swapped in as is
    assert copy(anchor="copy", anchor_offload=True) == 2 * n  # moved from host memory
    assert copy(precision="fp32") == 0  # fp32 EMA, fp32 policy (the CPU runs)
    # offloading moves the anchor off the GPU everywhere but in its own pass
    off = plan_memory(dataclasses.replace(x, anchor_offload=True))
    on = plan_memory(x)
    assert off.phases[0].total == pytest.approx(on.phases[0].total - 4 * n)
    assert off.phases[1].total == pytest.approx(on.phases[1].total - 4 * n)  # 4 + 2 B -> the 2 B copy


# ---- MoE (Qwen3-30B-A3B) -------------------------------------------------------------------------


def _moe(kind: str = "rl", **kw) -> PlanInputs:
    x = _shape(f"examples/qwen3_30b_a3b/{kind}.yaml", nodes=EXAMPLE_NODES[f"qwen3_30b_a3b/{kind}"])
    return dataclasses.replace(x, **kw)


def _hf_count(arch: str, **hf) -> int:
    """transformers' parameter count of the HF model, built on the meta device (no memory)."""
    import torch
    import transformers

    config = getattr(transformers, arch + "Config")(tie_word_embeddings=False, **hf)
    with torch.device("meta"):
        model = getattr(transformers, arch + "ForCausalLM")(config)
    return sum(p.numel() for p in model.parameters())


def test_qwen3_parameter_counts_equal_transformers():
    moe = _hf_count(
        "Qwen3Moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        intermediate_size=6144, vocab_size=151936,
    )  # fmt: skip
    c = count_parameters(_moe(), padded=False)
    assert c.total == moe and round(moe / 1e9, 1) == 30.5  # the card: 30.5B
    # active: the 8 of 128 experts a token is routed to (the card: 3.3B activated)
    experts = 48 * 128 * 3 * 2048 * 768
    assert c.experts == experts and c.active == moe - experts * 120 // 128
    assert 3.3e9 < c.active < 3.4e9  # 3.35B with the input embedding and the output layer
    dense = _hf_count(
        "Qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, intermediate_size=12288, vocab_size=151936,
    )  # fmt: skip
    c8 = count_parameters(_shape("examples/qwen3_8b/rl.yaml", nodes=1), padded=False)
    assert c8.total == dense and c8.active == dense and round(dense / 1e9, 2) == 8.19  # the card: 8.2B


def test_expert_parallelism_shards_experts_and_their_optimizer_over_expert_dp():
    x8 = _moe()
    x4 = dataclasses.replace(x8, ep=4)
    assert (x8.dp, x8.ep, x8.edp, x4.edp) == (16, 8, 2, 4)
    d8, e8 = rank_parameter_split(x8, 0)
    d4, e4 = rank_parameter_split(x4, 0)
    assert d8 == d4 and e8 == pytest.approx(e4 / 2)  # EP 4 -> 8 halves the expert weights per GPU
    # 16 of 128 experts per layer, each split over TP=2: 48 * 16 * 3 * 2048 * 768 / 2
    assert e8 == 48 * 16 * 3 * 2048 * 768 / 2
    p8, p4 = plan_memory(x8).phases[0], plan_memory(x4).phases[0]
    assert p4.get("weights") - p8.get("weights") == pytest.approx(2 * (e4 - e8))
    assert p4.get("gradients") - p8.get("gradients") == pytest.approx(4 * (e4 - e8))
    # distributed optimizer: dense states over DP, expert states over expert-DP = DP / EP
    assert p8.get("optimizer states") == pytest.approx(12 * d8 / 16 + 12 * e8 / 2)
    assert p4.get("optimizer states") == pytest.approx(12 * d4 / 16 + 12 * e4 / 4)
    # the fp32 EMA anchor is sharded like the policy: local experts only
    assert p8.get("anchor") == pytest.approx(4 * (d8 + e8))


def test_moe_activations_itemised_and_the_aux_softmax_only_with_its_coefficient():
    h, E, k, f = 2048, 128, 8, 768
    kw = dict(h=h, experts=E, topk=k, expert_ffn=f, tp=2, sp=True)
    # per routed copy (k per token under SP): the fc1 input 2h (TP-gathered), over TP the fc1 output
    # 2f, silu(gate), the x_linear copy, the product and its probability-scaled copy (6f of 2 B each),
    # and the probability
    copy = 2 * h + 2 * 6 * f / 2 + 2
    router = 20 * k + 2 * 3 * E  # top-k softmax + indices, sorted indices, probs / maps (bf16, bool)
    assert moe_saved_per_token(**kw) == k * copy + router / 2
    assert moe_saved_per_token(**kw, aux_loss=True) - moe_saved_per_token(**kw) == 4 * E / 2
    # through the config: the fp32 softmax over all experts appears only with the coefficient > 0
    on = _shape("examples/qwen3_30b_a3b/sft.yaml", nodes=2)
    off = inputs_from_config(
        load_config(ROOT / "examples/qwen3_30b_a3b/sft.yaml", ["model.moe_aux_loss_coeff=0"]), nodes=2
    )
    assert (on.moe_aux_loss, off.moe_aux_loss) == (True, False)
    work = [plan_memory(y).phases[0].get("recompute working set") for y in (on, off)]
    assert work[0] - work[1] == pytest.approx(4 * E / 2 * on.seq_length)
    # the MoE layer replaces the dense MLP's terms (ffn_hidden_size, HF's intermediate_size, is unused),
    # and the dispatcher's buffers are a line of their own
    no_ffn = plan_memory(dataclasses.replace(on, ffn=128)).phases[0].get("recompute working set")
    assert no_ffn == work[0]
    train = plan_memory(on).phases[0]
    names = [i.name for i in train.items]
    assert "MoE dispatcher buffers" in names
    T, local = on.seq_length, k * on.seq_length / 2
    assert train.get("MoE dispatcher buffers") == 2 * h * (2 * local + 2 * k * T)


def test_dense_plans_are_unchanged_by_the_moe_terms():
    # Phase totals (GiB) of the dense examples as the planner gave them before it knew MoE; a dense
    # config has no MoE line and no MoE numbers.
    before = {
        ("examples/qwen2.5_7b/rl.yaml", 1, "flash"): {
            "train": 51.872276306152344, "anchor log-probs": 37.23884391784668,
            "weight sync": 50.12597179412842, "rollout": 71.17266540527343,
        },
        ("examples/glm4_9b/sft.yaml", 1, "flash"): {"train": 39.0879020690918},
        ("examples/qwen2.5_32b/sft.yaml", 4, "unfused"): {"train": 70.64326477050781},
    }  # fmt: skip
    for (path, nodes, attention), totals in before.items():
        x = _shape(path, nodes=nodes, gpus_per_node=8, gpu_mem_gib=79.6, attention=attention)
        assert (x.num_experts, x.ep, x.topk, x.moe_aux_loss) == (0, 1, 0, False)
        d = plan_to_dict(plan_memory(x))
        assert {name: ph["total"] for name, ph in d["phases"].items()} == pytest.approx(totals, rel=1e-12)
        assert "params_active" not in d
        assert not any("MoE" in item for ph in d["phases"].values() for item in ph)
        assert rank_parameter_split(x, 0)[1] == 0


def test_moe_layouts_megatron_refuses_are_problems():
    x = _moe()
    assert plan_memory(x).fits and not plan_memory(x).problems
    bad = plan_memory(dataclasses.replace(x, num_experts=96, ep=32))  # 96 % 32 == 0, DP 16 % 32 != 0
    assert not bad.fits and not bad.phases
    assert any("EP=32 does not divide DP=16" in p and "data-parallel ranks" in p for p in bad.problems)
    bad = plan_memory(dataclasses.replace(x, num_experts=12, ep=8))  # DP 16 % 8 == 0, 12 % 8 != 0
    assert not bad.fits and any("EP=8 does not divide the 12 experts" in p for p in bad.problems)
    bad = plan_memory(dataclasses.replace(x, sp=False))
    assert any("only with parallel.sequence_parallel=true" in p for p in bad.problems) and not bad.fits
    dense = plan_memory(dataclasses.replace(_rl7b(), ep=2))
    assert any("EP=2 needs an MoE model" in p for p in dense.problems)


def test_cli_moe_table_shows_experts_ep_and_dispatcher_and_refuses_a_bad_ep():
    base = ["--config", "examples/qwen3_30b_a3b/sft.yaml", "--gpus-per-node", "8", "--gpu-mem", "79.6"]
    r = _plan_cli(*base, "--nodes", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    for text in (
        "128 experts of ffn 768 (top-8, aux loss)", "30.53B parameters (28.99B in experts), 3.35B active",
        "EP=8 (expert-DP=1, 16 experts/GPU)", "16 of 128 per layer, EP 8", "/ expert-DP 1 x",
        "MoE dispatcher buffers", "moe/load_max_over_mean", "verdict: fits",
    ):  # fmt: skip
        assert text in r.stdout, (text, r.stdout)
    # EP=16 needs DP >= 16: one node-pair gives DP=8
    bad = _plan_cli(*base, "--nodes", "2", "--set", "parallel.expert_model_parallel_size=16")
    assert bad.returncode == 3 and "problem: EP=16 does not divide DP=8" in bad.stdout, bad.stdout
    assumed = json.loads(_plan_cli("--config", "examples/qwen3_30b_a3b/rl.yaml", "--json").stdout)
    assert assumed["inputs"]["nodes"] == 2 and "TP x PP x EP" in assumed["notes"][0]  # 2 x 1 x 8 GPUs
    assert 3.3e9 < assumed["params_active"] < 3.4e9


def test_inputs_from_config_takes_the_packing_and_optimizer_steps():
    cfg = load_config(
        ROOT / "examples/qwen2.5_7b/rl.yaml", ["data.packing=mask", "loss.optim_steps_per_batch=2"]
    )
    x = inputs_from_config(cfg, nodes=1)
    assert (x.packing, x.layout, x.optim_steps_per_batch) == ("mask", "mask", 2)
    assert inputs_from_config(load_config(ROOT / "examples/qwen2.5_7b/rl.yaml"), nodes=1).layout == "thd"
    assert (
        inputs_from_config(
            load_config(ROOT / "examples/qwen2.5_7b/rl.yaml"), nodes=1, attention="unfused"
        ).layout
        == "mask"
    )


def test_more_parallelism_or_recompute_never_costs_memory():
    x = _shape("examples/qwen2.5_32b/sft.yaml")
    peaks = [plan_memory(dataclasses.replace(x, recompute=r)).peak for r in ("none", "selective", "full")]
    assert peaks[0] >= peaks[1] > peaks[2]
    assert plan_memory(dataclasses.replace(x, tp=4, sp=True)).peak > plan_memory(x).peak
    assert plan_memory(dataclasses.replace(x, nodes=8, global_batch=64)).peak < plan_memory(x).peak
    assert plan_memory(dataclasses.replace(x, micro_batch=2)).peak > plan_memory(x).peak


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_t1.plan", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_fits_prints_table_and_exit_0():
    r = _plan_cli(
        "--config", "examples/qwen2.5_32b/rl.yaml", "--nodes", "4", "--gpus-per-node", "8", "--gpu-mem", "80"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for line in ("weights", "gradients", "optimizer states", "anchor", "activations", "vLLM KV cache"):
        assert line in r.stdout
    assert "verdict: fits" in r.stdout


def test_cli_config_that_cannot_fit_explains_and_its_suggestion_fits():
    args = [
        "--config",
        "examples/qwen2.5_32b/sft.yaml",
        "--nodes",
        "1",
        "--gpus-per-node",
        "8",
        "--gpu-mem",
        "80",
        "--set",
        "parallel.tensor_model_parallel_size=2",
        "--set",
        "parallel.pipeline_model_parallel_size=1",
    ]
    r = _plan_cli(*args)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "verdict: DOES NOT FIT: train phase needs" in r.stdout and "largest: activations" in r.stdout
    tries = [ln.split("try: ", 1)[1] for ln in r.stdout.splitlines() if "try: " in ln]
    assert tries and any("tensor_model_parallel_size" in t or "recompute" in t for t in tries)
    # applying the first suggestion makes it fit
    sets = re.findall(r"([a-z_]+\.[a-z_]+=[\w.]+)", tries[0].split(": peak")[0])
    fixed = _plan_cli(*args, *[a for s in sets for a in ("--set", s)], "--json")
    assert fixed.returncode == 0 and json.loads(fixed.stdout)["fits"], fixed.stdout


def test_cli_layout_larger_than_the_job_names_the_problem():
    r = _plan_cli("--config", "examples/qwen2.5_32b/sft.yaml", "--nodes", "1")
    assert r.returncode == 3
    assert "TP x PP = 8 x 2 = 16 GPUs > 1 node(s) x 8 GPUs" in r.stdout
    # 2 nodes (DP=1) with selective recompute no longer fit on their own since the SwiGLU x_linear copy
    # and RoPE's cos / sin are counted (81.6 GiB): the suggestion adds full recompute to them.
    tries = [ln for ln in r.stdout.splitlines() if "try: " in ln]
    assert tries and "--nodes 2 (one model replica needs 16 GPUs)" in tries[0]


def test_cli_bad_config_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {num_layers: 2, wrong_key: 1}\n")
    r = _plan_cli("--config", str(bad))
    assert r.returncode == 2 and "wrong_key" in r.stderr


def test_planner_and_launcher_need_no_torch_megatron_or_vllm():
    script = (
        "import sys\n"
        "for m in ('torch', 'megatron', 'vllm'): sys.modules[m] = None\n"
        "import megatron_t1.launch, megatron_t1.plan as p\n"
        "sys.exit(p.main(['--config', 'examples/qwen2.5_7b/sft.yaml', '--nodes', '1', '--json']))\n"
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["fits"] is True


def test_job_shape_from_the_batch_script_and_the_allocation(tmp_path):
    from megatron_t1.config import ConfigError
    from megatron_t1.plan import job_shape

    assert job_shape("slurm/rl_32b.sh") == (4, 8, "from slurm/rl_32b.sh")
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH -N 2-3\n#SBATCH --gpus-per-node=h100:4\nsrun x\n")
    assert job_shape(str(script))[:2] == (2, 4)
    env = {"SLURM_JOB_NUM_NODES": "16", "SLURM_GPUS_ON_NODE": "8"}
    assert job_shape(None, env) == (16, 8, "from the Slurm allocation")
    assert job_shape(None, {}) == (None, None, "")
    script.write_text("#!/bin/bash\nsrun x\n")
    with pytest.raises(ConfigError, match="no '#SBATCH --nodes=N' line"):
        job_shape(str(script))
    with pytest.raises(ConfigError, match="cannot read it"):
        job_shape(str(tmp_path / "missing.sh"))


def test_cli_takes_the_node_count_from_the_job_or_says_it_assumed_one():
    base = ("--config", "examples/qwen2.5_32b/rl.yaml", "--gpu-mem", "80", "--json")
    job = json.loads(_plan_cli(*base, "--job", "slurm/rl_32b.sh").stdout)
    assert (job["inputs"]["nodes"], job["inputs"]["gpus_per_node"]) == (4, 8)
    assert job["notes"][0] == "job: 4 node(s) x 8 GPUs (from slurm/rl_32b.sh)"
    assumed = json.loads(_plan_cli(*base).stdout)
    assert assumed["inputs"]["nodes"] == 2 and "assumed" in assumed["notes"][0]
    # the job's 4 nodes give DP=2: the distributed optimizer halves the optimizer states
    assert job["phases"]["train"]["optimizer states"] < assumed["phases"]["train"]["optimizer states"]


def test_rollout_engines_that_do_not_tile_a_node_are_a_problem():
    x = _shape("examples/glm4_9b/rl.yaml", nodes=1)
    assert (x.engines_per_node, x.vllm_tp) == (4, 2)
    bad = plan_memory(dataclasses.replace(x, engines_per_node=3))
    assert not bad.fits
    assert any("engines_per_node x vllm_tensor_parallel_size = 3 x 2 != 8" in p for p in bad.problems)
    cfg = load_config(ROOT / "examples/glm4_9b/rl.yaml", ["rollout.engines_per_node=null"])
    assert inputs_from_config(cfg, nodes=1, gpus_per_node=8).engines_per_node == 4  # unset: fill the node
