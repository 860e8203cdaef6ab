"""Training a Qwen3-MoE policy with expert parallelism on 2 real gloo ranks.

A tiny Qwen3MoeForCausalLM (4 experts, top 2, built with transformers) is loaded into Megatron-Core
at three layouts of the same 2 ranks, all data-parallel over 2: EP=1 (each rank holds every expert),
EP=2 (experts 0-1 on rank 0, 2-3 on rank 1, tokens sent over gloo all-to-all), and EP=2 with the
distributed optimizer. Checked:

* the export at EP=2 (what the weight sync sends to vLLM) equals the HF tensors bitwise, before
  training; after two SFT steps every layout has the same loss, gradient norm and weights;
* a checkpoint saved at EP=2 loads at EP=1 to the same weights (expert offsets in the sharded keys);
* the router load metric of step 1 equals one computed plainly from transformers' router logits
  (top-k choices counted per layer, over the 4 rows of both ranks);
* the RL loop (T1 step, EMA anchor, log-probs, HF engine per rank, weight sync) runs 2 steps at EP=2
  with finite numbers, the load metric, and the engines in parity with the trainer; and again with
  ``loss.routing_replay`` (the engines record each token's experts, every trainer forward replays
  them), where the trainer's own routing agrees with the engines' on >= 99% of (token, layer) pairs.

All layouts run in ONE spawn (process start and ``import megatron.core`` cost ~7 s).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist.harness import run_ranks
from tests.e2e.test_rl_cli import data  # noqa: F401  (a fixture: the tokenizer and 16 prompts)
from tests.unit.test_convert_ckpt import VOCAB, build_hf_model, make_hf_dir

pytestmark = pytest.mark.dist

SEQ = 32
LAYOUTS = {"ep1": (1, False), "ep2": (2, False), "ep2_distopt": (2, True)}  # EP, distributed optimizer


def _rows():
    import torch

    g = torch.Generator().manual_seed(11)
    toks = torch.randint(0, VOCAB, (4, SEQ + 1), generator=g)
    return [
        {
            "tokens": toks[i : i + 1, :-1],
            "labels": toks[i : i + 1, 1:],
            "loss_mask": torch.ones(1, SEQ),
            "position_ids": torch.arange(SEQ).unsqueeze(0),
            "attention_mask": None,
        }
        for i in range(4)
    ]


def _cfg(hf_dir: str, ep: int, dist_opt: bool, out: str):
    from megatron_t1.config import Config, DataConfig, OptimConfig, ParallelConfig, RunConfig
    from megatron_t1.convert.registry import model_config_from_hf_dir

    mc = model_config_from_hf_dir(hf_dir)[1]
    mc.moe_aux_loss_coeff = 0.01  # the load-balancing loss trains the routers of every layout alike
    cfg = Config(
        model=mc,
        parallel=ParallelConfig(
            expert_model_parallel_size=ep, use_distributed_optimizer=dist_opt, timeout_minutes=3
        ),
        data=DataConfig(seq_length=SEQ, micro_batch_size=1, global_batch_size=4),
        optim=OptimConfig(lr=1e-2, lr_decay_style="constant"),
        run=RunConfig(device="cpu", output_dir=out, train_steps=2),
    )
    cfg.validate(world_size=2)
    return cfg


def _export(cfg, chunks) -> dict:
    from megatron_t1.mcore.export import iter_hf_buckets

    return {n: t.clone() for bucket in iter_hf_buckets(chunks, cfg) for n, t in bucket}


def _worker(rank, world, hf_dir, out):
    from megatron_t1.mcore.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from megatron_t1.mcore.convert_io import load_hf_into_model
    from megatron_t1.mcore.forward import sft_forward_step
    from megatron_t1.mcore.model import build_model, unwrap
    from megatron_t1.mcore.parallel import destroy_parallel, init_parallel
    from megatron_t1.mcore.train_step import build_optimizer, train_step

    rows = _rows()
    res: dict = {}
    for name, (ep, dist_opt) in LAYOUTS.items():
        cfg = _cfg(hf_dir, ep, dist_opt, out)
        ctx = init_parallel(cfg.parallel, seed=1234, device="cpu")
        chunks = build_model(cfg)
        load_hf_into_model(chunks, hf_dir, cfg)
        if name == "ep2":
            res["ep2_export_before"] = _export(cfg, chunks)
            res["ep2_local_experts"] = len(unwrap(chunks[0]).decoder.layers[0].mlp.experts.local_experts)
        opt, sched = build_optimizer(cfg, chunks)
        mine = rows[ctx.dp_rank * 2 : (ctx.dp_rank + 1) * 2]
        steps = []
        for _ in range(2):
            r = train_step(chunks, opt, sched, sft_forward_step, mine, seq_length=SEQ, micro_batch_size=1)
            steps.append({"loss": r.loss, "grad_norm": r.grad_norm, "tokens": r.tokens, **r.moe})
        res[name] = steps
        res[f"{name}_export"] = _export(cfg, chunks)
        if name == "ep2":
            save_checkpoint(f"{out}/ep2", 2, cfg, chunks, opt, sched)
    # EP=1 (DP=2) loads the checkpoint saved at EP=2
    cfg = _cfg(hf_dir, 1, False, out)
    init_parallel(cfg.parallel, seed=1234, device="cpu")
    chunks = build_model(cfg)
    load_checkpoint(latest_checkpoint(f"{out}/ep2"), cfg, chunks, weights_only=True)
    res["ep1_from_ep2_export"] = _export(cfg, chunks)
    destroy_parallel()
    return res


def _reference_load(rows) -> dict:
    """The load metric computed plainly: transformers' router logits of the 4 rows, top-k experts per
    token, counted per layer in float64."""
    import torch

    from megatron_t1.mcore.moe import load_metrics

    model = build_hf_model("qwen3_moe")
    k, experts = model.config.num_experts_per_tok, model.config.num_experts
    counts = torch.zeros(model.config.num_hidden_layers, experts, dtype=torch.float64)
    with torch.no_grad():
        for r in rows:
            logits = model(r["tokens"], output_router_logits=True).router_logits  # per layer [tokens, E]
            for layer, lg in enumerate(logits):
                top = lg.topk(k, dim=-1).indices.reshape(-1)
                counts[layer] += torch.bincount(top, minlength=experts).double()
    return load_metrics(counts)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe_train")
    hf_dir = make_hf_dir("qwen3_moe", tmp / "hf")
    return run_ranks(_worker, 2, args=(str(hf_dir), str(tmp / "runs")), timeout=400), hf_dir


def test_ep2_export_equals_the_hf_tensors_bitwise(results):
    import torch

    from tests.unit.test_convert_ckpt import hf_tensors

    (r0, r1), hf_dir = results
    assert r0["ep2_local_experts"] == r1["ep2_local_experts"] == 2  # the experts really are split
    ref = hf_tensors(hf_dir)
    got = r0["ep2_export_before"]
    assert sorted(got) == sorted(ref)
    for name, t in ref.items():
        assert torch.equal(got[name], t), name


def test_layouts_train_identically(results):
    import torch

    (r0, r1), _ = results
    base = r0["ep1"]
    for name in LAYOUTS:
        for rank_res in (r0, r1):
            for step, (got, want) in enumerate(zip(rank_res[name], base)):
                assert got["tokens"] == want["tokens"] == 4 * SEQ
                for key in ("loss", "grad_norm"):
                    assert got[key] == pytest.approx(want[key], rel=1e-5), (name, step, key)
    assert base[1]["loss"] < base[0]["loss"]  # it trains
    want = r0["ep1_export"]
    for name in ("ep2", "ep2_distopt"):
        got = r0[f"{name}_export"]
        assert sorted(got) == sorted(want)
        for t in want:
            torch.testing.assert_close(got[t], want[t], rtol=1e-4, atol=1e-6, msg=f"{name}: {t}")
    # training moved the experts: the comparison above is not of untouched weights
    before = r0["ep2_export_before"]
    expert = next(n for n in want if ".experts.3." in n)
    assert (want[expert] - before[expert]).abs().max() > 1e-4


def test_checkpoint_saved_at_ep2_loads_at_ep1(results):
    import torch

    (r0, _), _ = results
    got, want = r0["ep1_from_ep2_export"], r0["ep2_export"]
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_router_load_metric_matches_transformers_router(results):
    (r0, r1), _ = results
    ref = _reference_load(_rows())
    assert ref["moe/tokens_routed"] == 2 * 4 * SEQ * 2  # layers x tokens x top-k
    for name in LAYOUTS:
        for rank_res in (r0, r1):  # step 1 routes with the HF weights; the table is job-wide
            got = rank_res[name][0]
            for key, value in ref.items():
                assert got[key] == pytest.approx(value, rel=1e-12), (name, key)
    assert 1.0 < ref["moe/load_max_over_mean"] <= 2.0  # E / k = 2 is the worst case


# -- the RL loop at EP=2 ------------------------------------------------------------------------


def _rl_worker(rank, world, data_dir, out, extra):
    from megatron_t1.config import load_config
    from megatron_t1.mcore.parallel import destroy_parallel
    from megatron_t1.train.rl import run_rl

    cfg = load_config(
        None,
        [
            "model.arch=qwen3_moe", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96",
            "model.num_attention_heads=4", "model.num_query_groups=2", "model.kv_channels=32",
            "model.qk_layernorm=true", "model.add_qkv_bias=false", "model.tie_word_embeddings=false",
            "model.num_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32",
            "model.moe_aux_loss_coeff=0.01", "model.vocab_size=512", "model.max_position_embeddings=256",
            f"model.tokenizer={data_dir}/tok", "parallel.expert_model_parallel_size=2",
            f"data.train_path={data_dir}/prompts.jsonl", "data.seq_length=96", "data.micro_batch_size=4",
            "data.global_batch_size=8", "optim.lr=1e-3", "optim.lr_decay_style=constant",
            "rollout.prompts_per_step=4", "rollout.n_samples=4", "rollout.max_new_tokens=24",
            "rollout.temperature=1.2", "reward.num_workers=1", "loss.entropy_coef=0.01", "anchor.ema=0.9",
            "run.name=moe", f"run.output_dir={out}", "run.train_steps=2", "run.device=cpu",
            "log.progress_bar=false", "log.tensorboard=false", "eval.eval_at_start=false", *extra,
        ],
    )  # fmt: skip
    run_rl(cfg)
    destroy_parallel()
    return True


@pytest.mark.slow
@pytest.mark.parametrize("replay", [False, True], ids=["own_routing", "routing_replay"])
def test_rl_loop_runs_two_steps_at_ep2(data, tmp_path, replay):  # noqa: F811
    extra = ["loss.routing_replay=true"] if replay else []
    run_ranks(_rl_worker, 2, args=(str(data), str(tmp_path), extra), timeout=400)
    rows = [json.loads(line) for line in Path(tmp_path / "moe" / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(steps) == [1, 2]
    for row in steps.values():
        for key in ("loss", "reward_mean", "kl_anchor", "m/entropy", "grad_norm", "mismatch_mean"):
            assert row[key] == row[key] and abs(row[key]) < 1e6, key  # finite
        assert 1.0 <= row["moe/load_max_over_mean"] <= 2.0
        assert row["moe/tokens_routed"] > 0
        assert row["sync/parity_mean_abs"] < 1e-4 and row["sync/engines"] == 2
        if replay:  # the engines recorded the routing; fp32 on both sides: the trainer agrees
            assert row["moe/route_agreement"] >= 0.99
            assert row["mismatch_mean"] < 1e-4
        else:
            assert "moe/route_agreement" not in row
