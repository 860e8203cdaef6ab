"""The config tree: strict YAML, overrides, validation messages, HF config reading, round trip."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_t1.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    config_from_dict,
    load_config,
    model_config_from_hf,
    save_config,
)


def _write(tmp_path, text: str, name: str = "c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_follow_t1(tmp_path):
    cfg = load_config(None)
    assert cfg.rollout.n_samples == 64 and cfg.rollout.temperature == pytest.approx(1.2)
    assert cfg.loss.kl_coef == pytest.approx(2e-4) and cfg.loss.entropy_coef == pytest.approx(1e-3)
    assert cfg.anchor.ema == pytest.approx(0.99) and cfg.anchor.reset_every is None


def test_unknown_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, "optim:\n  lr: 1.0e-5\n  lerning_rate: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "lerning_rate" in str(e.value) and str(p) in str(e.value) and "optim" in str(e.value)


def test_unknown_section(tmp_path):
    p = _write(tmp_path, "optimizer:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(p)


def test_wrong_type_names_field_and_value(tmp_path):
    p = _write(tmp_path, "model:\n  num_layers: four\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "model.num_layers" in str(e.value) and "'four'" in str(e.value)
    p = _write(tmp_path, "log:\n  tensorboard: 1\n", "b.yaml")
    with pytest.raises(ConfigError, match="log.tensorboard"):
        load_config(p)
    p = _write(tmp_path, "model:\n  precision: fp8\n", "d.yaml")
    with pytest.raises(ConfigError, match="model.precision"):
        load_config(p)


def test_float_written_yaml11_style_and_ints(tmp_path):
    p = _write(tmp_path, "optim:\n  lr: 1e-5\n  min_lr: 0\n")
    cfg = load_config(p)
    assert cfg.optim.lr == pytest.approx(1e-5) and isinstance(cfg.optim.min_lr, float)


def test_overrides(tmp_path):
    p = _write(tmp_path, "optim:\n  lr: 1.0e-5\n")
    cfg = load_config(p, ["optim.lr=3e-4", "run.name=abc", "anchor.ema=null", "anchor.reset_every=50"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.run.name == "abc"
    assert cfg.anchor.ema is None and cfg.anchor.reset_every == 50
    with pytest.raises(ConfigError, match="nope"):
        load_config(p, ["optim.nope=1"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(p, ["optim.lr"])


@pytest.mark.parametrize(
    "tree, match",
    [
        (
            {"model": {"num_attention_heads": 4}, "parallel": {"tensor_model_parallel_size": 8}},
            "num_attention_heads",
        ),
        # GLM-4-9B: 32 heads, 2 KV groups -> TP <= 2.
        (
            {
                "model": {
                    "num_attention_heads": 32,
                    "num_query_groups": 2,
                    "hidden_size": 4096,
                    "ffn_hidden_size": 13696,
                },
                "parallel": {"tensor_model_parallel_size": 4},
            },
            "num_query_groups",
        ),
        ({"model": {"num_layers": 3}, "parallel": {"pipeline_model_parallel_size": 2}}, "num_layers"),
        (
            {
                "model": {"num_layers": 4},
                "parallel": {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 4},
            },
            "pipeline stages",
        ),
        ({"parallel": {"sequence_parallel": True}}, "sequence_parallel"),
        ({"anchor": {"ema": 0.9, "reset_every": 10}}, "reset_every"),
        ({"rollout": {"n_samples": 1}}, "n_samples"),
        ({"data": {"seq_length": 8192}, "model": {"max_position_embeddings": 4096}}, "seq_length"),
    ],
)
def test_impossible_layouts_fail_early(tree, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(tree)


def test_world_size_checks():
    cfg = config_from_dict(
        {
            "parallel": {"tensor_model_parallel_size": 2},
            "data": {"global_batch_size": 6, "micro_batch_size": 2},
        }
    )
    with pytest.raises(ConfigError, match="world size 3"):
        cfg.validate(world_size=3)
    with pytest.raises(ConfigError, match="global_batch_size"):
        cfg.validate(world_size=4)  # DP=2, micro 2 -> 6 % 4 != 0
    cfg.validate(world_size=2)
    assert (
        ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).data_parallel_size(8)
        == 2
    )


def test_padded_vocab():
    cfg = config_from_dict({"model": {"vocab_size": 151936, "make_vocab_size_divisible_by": 128}})
    assert cfg.model.padded_vocab_size(1) == 151936
    assert cfg.model.padded_vocab_size(8) % (128 * 8) == 0 and cfg.model.padded_vocab_size(8) >= 151936
    assert config_from_dict({"model": {"vocab_size": 250}}).model.padded_vocab_size(2) == 256


def _hf(tmp_path, **kw):
    base = {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 5120,
        "intermediate_size": 27648,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "num_hidden_layers": 64,
        "vocab_size": 152064,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    }
    base.update(kw)
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(base))
    return d


def test_model_from_hf_qwen2_32b(tmp_path):
    m = model_config_from_hf(_hf(tmp_path))
    assert m["arch"] == "qwen2" and m["num_layers"] == 64 and m["num_query_groups"] == 8
    assert m["add_qkv_bias"] is True and m["tie_word_embeddings"] is False and m["kv_channels"] is None
    assert m["rope_theta"] == 1e6 and m["norm_epsilon"] == 1e-5


def test_model_from_hf_glm_partial_rotary(tmp_path):
    d = _hf(
        tmp_path,
        architectures=["GlmForCausalLM"],
        num_key_value_heads=2,
        partial_rotary_factor=0.5,
        attention_bias=True,
        head_dim=128,
        hidden_size=4096,
        num_attention_heads=32,
    )
    m = model_config_from_hf(d)
    assert m["arch"] == "glm" and m["rotary_percent"] == 0.5 and m["num_query_groups"] == 2


def test_model_from_hf_qwen3(tmp_path):
    """Qwen3-8B's shape: q/k norms, no bias, head_dim 128 explicit (here also = hidden / heads)."""
    qwen3 = dict(architectures=["Qwen3ForCausalLM"], hidden_size=4096, num_attention_heads=32, head_dim=128)
    m = model_config_from_hf(_hf(tmp_path, **qwen3, attention_bias=False, use_sliding_window=False))
    assert m["arch"] == "qwen3" and m["qk_layernorm"] is True and m["add_qkv_bias"] is False
    assert m["kv_channels"] is None and not m.get("add_bias_linear", False)
    # Qwen3-0.6B: 16 heads of 128 on a width of 1024; without head_dim, transformers' default is 128
    m = model_config_from_hf(_hf(tmp_path, **(qwen3 | {"hidden_size": 1024, "num_attention_heads": 16})))
    assert m["kv_channels"] == 128
    del qwen3["head_dim"]
    assert model_config_from_hf(_hf(tmp_path, **(qwen3 | {"hidden_size": 1024})))["kv_channels"] == 128
    with pytest.raises(ConfigError, match="attention_bias=true"):
        model_config_from_hf(_hf(tmp_path, **qwen3, attention_bias=True))
    with pytest.raises(ConfigError, match="sliding-window"):
        model_config_from_hf(_hf(tmp_path, **qwen3, use_sliding_window=True))


def test_model_from_hf_qwen3_moe(tmp_path):
    """Qwen3-30B-A3B's shape: Qwen3 attention, 128 experts of 768, top 8, renormalised weights."""
    moe = dict(
        architectures=["Qwen3MoeForCausalLM"], hidden_size=2048, num_attention_heads=32, head_dim=128,
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
        router_aux_loss_coef=0.001, decoder_sparse_step=1, mlp_only_layers=[],
    )  # fmt: skip
    m = model_config_from_hf(_hf(tmp_path, **moe))
    assert m["arch"] == "qwen3_moe" and m["qk_layernorm"] is True and m["add_qkv_bias"] is False
    assert (m["num_experts"], m["moe_router_topk"], m["moe_ffn_hidden_size"]) == (128, 8, 768)
    assert m["norm_topk_prob"] is True and m["moe_aux_loss_coeff"] == 0.001 and m["kv_channels"] == 128
    mc = ModelConfig(**m)
    assert mc.expert_ffn == 768
    with pytest.raises(ConfigError, match="decoder_sparse_step=2"):
        model_config_from_hf(_hf(tmp_path, **(moe | {"decoder_sparse_step": 2})))
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        model_config_from_hf(_hf(tmp_path, **(moe | {"mlp_only_layers": [0]})))
    with pytest.raises(ConfigError, match="moe_intermediate_size"):
        model_config_from_hf(_hf(tmp_path, **{k: v for k, v in moe.items() if k != "moe_intermediate_size"}))


def test_moe_fields_and_expert_parallel_validation():
    with pytest.raises(ConfigError, match="moe_router_topk"):
        ModelConfig(num_experts=4, moe_router_topk=5)
    with pytest.raises(ConfigError, match="num_experts must be >= 2"):
        ModelConfig(num_experts=1)
    with pytest.raises(ConfigError, match="moe_grouped_gemm=true needs model.num_experts"):
        ModelConfig(moe_grouped_gemm=True)
    with pytest.raises(ConfigError, match="moe_aux_loss_coeff"):
        ModelConfig(num_experts=4, moe_aux_loss_coeff=-1.0)
    cfg = Config(
        model=ModelConfig(num_experts=4, moe_ffn_hidden_size=30),
        parallel=ParallelConfig(tensor_model_parallel_size=4),
    )
    with pytest.raises(ConfigError, match="moe_ffn_hidden_size .30. is not divisible"):
        cfg.validate()
    p = ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2)
    assert p.data_parallel_size(8) == 4
    with pytest.raises(ConfigError, match=r"data-parallel size 3 .*expert_model_parallel_size \(2\)"):
        p.data_parallel_size(6)
    with pytest.raises(ConfigError, match=r"num_experts \(3\) is not divisible by parallel.expert"):
        Config(model=ModelConfig(num_experts=3), parallel=p).validate()
    with pytest.raises(ConfigError, match="expert_model_parallel_size > 1 needs model.num_experts"):
        Config(parallel=p).validate()
    cfg = Config(model=ModelConfig(num_experts=4), parallel=p, data=DataConfig(train_path="x.jsonl"))
    cfg.validate(world_size=4, stage="sft")  # EP takes its ranks from DP = 4 / TP


def test_hf_config_in_yaml_and_conflicts(tmp_path):
    d = _hf(tmp_path)
    p = _write(tmp_path, f"model:\n  hf_config: {d}\n")
    cfg = load_config(p)
    assert cfg.model.hidden_size == 5120 and cfg.model.vocab_size == 152064
    p = _write(tmp_path, f"model:\n  hf_config: {d}\n  hidden_size: 64\n", "x.yaml")
    with pytest.raises(ConfigError, match="hidden_size"):
        load_config(p)
    bad = _hf(tmp_path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        model_config_from_hf(bad)


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(None, ["run.name=rt", "optim.lr=2e-5", "anchor.ema=null", "anchor.reset_every=7"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg and isinstance(again, Config)
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_cli_reports_config_error_on_one_line(tmp_path):
    p = _write(tmp_path, "model:\n  num_layerz: 2\n")
    r = subprocess.run(
        [sys.executable, "-m", "megatron_t1", "sft", "--config", str(p)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and "num_layerz" in lines[-1] and "Traceback" not in r.stderr


def test_help_lists_commands():
    r = subprocess.run(
        [sys.executable, "-m", "megatron_t1", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0
    for cmd in ("sft", "rl", "eval", "demo", "score", "plan"):
        assert cmd in r.stdout


def test_hf_rope_scaling_and_llama_bias_are_refused(tmp_path):
    d = _hf(tmp_path, architectures=["LlamaForCausalLM"], rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ConfigError, match="llama3"):
        model_config_from_hf(d)
    d = _hf(tmp_path, architectures=["LlamaForCausalLM"], attention_bias=True, mlp_bias=False)
    with pytest.raises(ConfigError, match="attention_bias"):
        model_config_from_hf(d)
    d = _hf(
        tmp_path,
        architectures=["GlmForCausalLM"],
        rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.25},
    )
    assert model_config_from_hf(d)["rotary_percent"] == 0.25


def test_stage_checks_name_the_missing_field():
    cfg = Config()
    with pytest.raises(ConfigError, match="data.train_path: an SFT dataset"):
        cfg.validate(stage="sft")
    with pytest.raises(ConfigError, match="data.train_path: an RL prompt set"):
        cfg.validate(stage="rl")
    cfg.data.train_path = "prompts.jsonl"
    cfg.validate(stage="rl")
    cfg.eval.eval_every = 5
    with pytest.raises(ConfigError, match="eval.eval_every is set but eval.heldout_path is not"):
        cfg.validate(stage="rl")
    cfg.validate(stage="sft")  # held-out evaluation is the RL loop's
    cfg.eval.heldout_path, cfg.eval.eval_every = "val.jsonl", 0
    cfg.checkpoint.keep_best = True
    with pytest.raises(ConfigError, match="keep_best selects among held-out evaluations"):
        cfg.validate(stage="rl")
    cfg.eval.eval_every = 5
    cfg.validate(stage="rl")
    with pytest.raises(ValueError, match="stage"):
        cfg.validate(stage="dpo")


def test_prompt_template_is_a_checked_field_and_the_demo_sets_its_own(tmp_path):
    from megatron_t1.data.synthetic import DEMO_PROMPT_TEMPLATE
    from megatron_t1.data.template import DEFAULT_PROMPT_TEMPLATE

    assert load_config(None).data.prompt_template == DEFAULT_PROMPT_TEMPLATE
    assert load_config("examples/tiny_cpu/rl.yaml").data.prompt_template == DEMO_PROMPT_TEMPLATE
    p = _write(tmp_path, "data:\n  prompt_template: 'Solve: {problem}'\n")
    with pytest.raises(ConfigError, match=r"data.prompt_template must contain \{question\} exactly once"):
        load_config(p)
    cfg = load_config(None, ["data.system_prompt=You are a careful mathematician."])
    assert cfg.data.system_prompt == "You are a careful mathematician."
