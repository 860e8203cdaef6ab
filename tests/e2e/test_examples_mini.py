"""The Qwen3 examples' own configs, run end to end in miniature: a tiny HF model of the example's
architecture is converted (``convert_ckpt.py hf-to-mcore``), ``sft`` runs examples/NAME/sft.yaml from
it and ``rl`` runs examples/NAME/rl.yaml from the SFT's checkpoints, under torchrun.

Only what a 2-core CPU cannot hold is overridden (:func:`miniature`): the model's sizes (its
architecture flags stay: q/k norms, head_dim != hidden / heads, untied head, experts and top-k
routing, aux loss), bf16 -> fp32, paths, lengths and batch sizes, vLLM -> the HF engine, and the
layout, scaled to the same *kinds* of parallelism (TP with sequence parallelism; for the MoE
example also EP over the data-parallel ranks, so TP=2 x DP=2 x EP=2 on 4 ranks). Everything else
is the example's: recompute, fused output layer, KL / entropy / estimator / aggregation settings,
EMA anchor, optimizer, distributed optimizer, selection, temperatures, eval cadence (scaled).
A change that breaks an example's combination of settings fails here instead of on the cluster.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.e2e.proc import ROOT
from tests.e2e.proc import run_cli as _run
from tests.e2e.test_rl_cli import data  # noqa: F401  (a fixture: the tokenizer and 16 prompts)

pytestmark = pytest.mark.slow

MINI_MODEL = dict(
    num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
    kv_channels=32, vocab_size=512, max_position_embeddings=256,
)  # fmt: skip
MINI_MOE = dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32)
EXAMPLES = {"qwen3_8b": (2, 1), "qwen3_30b_a3b": (2, 2)}
"""Example -> (TP, EP) of its miniature; world = TP x EP (DP = EP)."""


def _hf_model(arch: str, out: Path) -> Path:
    """A tiny transformers model of ``arch`` at the miniature's shapes, saved as an HF folder."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    m = MINI_MODEL
    common = dict(
        hidden_size=m["hidden_size"], intermediate_size=m["ffn_hidden_size"],
        num_hidden_layers=m["num_layers"], num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m["num_query_groups"], head_dim=m["kv_channels"], vocab_size=m["vocab_size"],
        max_position_embeddings=m["max_position_embeddings"], rms_norm_eps=1e-6, rope_theta=1e6,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    if arch == "qwen3_moe":
        moe = dict(
            num_experts=MINI_MOE["num_experts"], num_experts_per_tok=MINI_MOE["moe_router_topk"],
            moe_intermediate_size=MINI_MOE["moe_ffn_hidden_size"], norm_topk_prob=True,
        )  # fmt: skip
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, **moe))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    model.save_pretrained(out)
    return out


def miniature(example: dict, *, tp: int, ep: int, paths: dict) -> list[str]:
    """``--set`` overrides that shrink one example config (a dict from its YAML) to the miniature."""
    m, p = example["model"], example["parallel"]
    sets = {f"model.{k}": v for k, v in MINI_MODEL.items()}
    if m.get("num_experts"):
        sets.update({f"model.{k}": v for k, v in MINI_MOE.items()})
    sets |= {
        "model.precision": "fp32", "model.tokenizer": paths["tok"],
        "parallel.tensor_model_parallel_size": tp, "parallel.pipeline_model_parallel_size": 1,
        "parallel.expert_model_parallel_size": ep,
        "parallel.sequence_parallel": bool(p.get("sequence_parallel")) and tp > 1,
        "data.train_path": paths["train"], "data.seq_length": 96, "data.micro_batch_size": 1,
        "data.global_batch_size": 2 * ep, "optim.lr_warmup_steps": 0,
        "run.output_dir": paths["out"], "run.train_steps": 2, "run.device": "cpu",
        "checkpoint.init_from": paths["init"], "checkpoint.save_interval": 2,
        "log.progress_bar": False,
    }  # fmt: skip
    if "rollout" in example:
        sets |= {
            "rollout.engine": "hf", "rollout.prompts_per_step": tp * ep, "rollout.n_samples": 2,
            "rollout.max_new_tokens": 24, "rollout.engines_per_node": None,
            "rollout.vllm_tensor_parallel_size": 1, "reward.num_workers": 1,
            "eval.heldout_path": paths["train"], "eval.heldout_size": 4, "eval.max_new_tokens": 24,
            "eval.eval_every": 2,
        }  # fmt: skip
    return [x for k, v in sets.items() for x in ("--set", f"{k}={_yaml(v)}")]


def _yaml(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _torchrun(world: int, stage: str, config: Path, sets: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
        "-m", "megatron_t1", stage, "--config", str(config), *sets,
    ]  # fmt: skip


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_in_miniature(name, data, tmp_path):  # noqa: F811
    import yaml

    from megatron_t1.convert.offline import hf_to_mcore
    from megatron_t1.data.io import write_jsonl_atomic
    from megatron_t1.data.synthetic import make_sft_examples

    tp, ep = EXAMPLES[name]
    world = tp * ep
    sft_yaml, rl_yaml = (ROOT / "examples" / name / f"{s}.yaml" for s in ("sft", "rl"))
    sft_cfg, rl_cfg = (yaml.safe_load(p.read_text()) for p in (sft_yaml, rl_yaml))
    arch = sft_cfg["model"]["arch"]
    assert rl_cfg["model"]["arch"] == arch

    hf = _hf_model(arch, tmp_path / "hf")
    converted = hf_to_mcore(hf, tmp_path / "converted", progress=False)
    write_jsonl_atomic(tmp_path / "sft.jsonl", make_sft_examples(64, seed=7))

    sft_sets = miniature(
        sft_cfg, tp=tp, ep=ep,
        paths={"tok": data / "tok", "train": tmp_path / "sft.jsonl", "out": tmp_path, "init": converted},
    )  # fmt: skip
    r = _run(_torchrun(world, "sft", sft_yaml, sft_sets), timeout=420)
    assert r.returncode == 0, r.stderr[-3000:]
    sft_dir = tmp_path / sft_cfg["run"]["name"]
    sft = [x for x in _records(sft_dir) if "loss" in x]
    assert [x["step"] for x in sft] == [1, 2]
    assert all(0 < x["loss"] < 20 for x in sft)  # finite, from the converted weights (not a NaN)

    rl_sets = miniature(
        rl_cfg, tp=tp, ep=ep,
        paths={"tok": data / "tok", "train": data / "prompts.jsonl", "out": tmp_path,
               "init": sft_dir / "checkpoints"},
    )  # fmt: skip
    r = _run(_torchrun(world, "rl", rl_yaml, rl_sets), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _records(tmp_path / rl_cfg["run"]["name"])
    steps = {x["step"]: x for x in rows if "loss" in x}
    assert sorted(steps) == [1, 2]
    for s in steps.values():
        assert all(abs(s[k]) < 1e6 for k in ("loss", "kl_anchor", "grad_norm")), s
    if "num_experts" in rl_cfg["model"]:  # the router's load, every step (EP ranks' tokens together)
        assert all(1.0 <= s["moe/load_max_over_mean"] <= MINI_MOE["num_experts"] for s in steps.values())
    assert any("eval" in k or "heldout" in k for x in rows for k in x), "the example's eval did not run"
