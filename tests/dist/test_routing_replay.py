"""Routing replay on Megatron-Core's MoE layer: 2 gloo ranks, EP=2 (alltoall dispatcher), DP=2.

The tiny Qwen3-MoE of the conversion tests is loaded with ``loss.routing_replay``; each rank takes
two rows of tokens and two recorded routings of them: transformers' own top-k (what the HF rollout
engine records) and a random one (k distinct experts per token). Checked:

* replaying the model's own routing changes nothing: logits equal the plain forward's, a training
  step has the same loss and gradient norm, and ``moe/route_agreement`` is 1;
* replaying a random routing routes every token exactly there (the routers' ``routing_map``), changes
  the logits, and agreement falls to about chance;
* the router is still trained under replay (no aux loss: its only gradient is through the replayed
  experts' probabilities).

The RL loop with ``loss.routing_replay`` at EP=2 is tests/dist/test_moe_train.py's RL test.
"""

from __future__ import annotations

import pytest

from tests.dist.harness import run_ranks
from tests.unit.test_convert_ckpt import VOCAB, make_hf_dir

pytestmark = pytest.mark.dist

SEQ = 24


def _worker(rank, world, hf_dir, out):
    from functools import partial

    import torch
    from transformers import AutoModelForCausalLM

    from megatron_t1.config import Config, DataConfig, OptimConfig, ParallelConfig, RunConfig
    from megatron_t1.convert.registry import model_config_from_hf_dir
    from megatron_t1.mcore.convert_io import load_hf_into_model
    from megatron_t1.mcore.forward import model_forward, sft_loss
    from megatron_t1.mcore.model import build_model, unwrap
    from megatron_t1.mcore.moe import RouteAgreement, recorded_routing
    from megatron_t1.mcore.parallel import destroy_parallel, init_parallel
    from megatron_t1.mcore.train_step import build_optimizer, train_step
    from megatron_t1.rl.config import LossConfig

    mc = model_config_from_hf_dir(hf_dir)[1]
    mc.moe_aux_loss_coeff = 0.0  # the router's only gradient is then the one through its probabilities
    cfg = Config(
        model=mc,
        parallel=ParallelConfig(expert_model_parallel_size=2, timeout_minutes=3),
        data=DataConfig(seq_length=SEQ, micro_batch_size=1, global_batch_size=4),
        optim=OptimConfig(lr=1e-2, lr_warmup_steps=0, lr_decay_style="constant"),
        run=RunConfig(device="cpu", output_dir=out, train_steps=1),
        loss=LossConfig(routing_replay=True),
    )
    cfg.validate(world_size=2)
    ctx = init_parallel(cfg.parallel, seed=1234, device="cpu")
    chunks = build_model(cfg)
    load_hf_into_model(chunks, hf_dir, cfg)
    model = chunks[0]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    k, E = hf.config.num_experts_per_tok, hf.config.num_experts

    g = torch.Generator().manual_seed(5)
    toks = torch.randint(3, VOCAB, (4, SEQ + 1), generator=g)
    rows = []
    for i in range(ctx.dp_rank * 2, ctx.dp_rank * 2 + 2):
        with torch.no_grad():
            lg = hf(toks[i : i + 1, :-1], output_router_logits=True).router_logits
        own = torch.stack([x.topk(k, -1).indices for x in lg], dim=1)  # [SEQ, layers, k]
        rand = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(SEQ * len(lg))])
        rows.append(
            {
                "tokens": toks[i : i + 1, :-1],
                "labels": toks[i : i + 1, 1:],
                "loss_mask": torch.ones(1, SEQ),
                "position_ids": torch.arange(SEQ).unsqueeze(0),
                "own": own.to(torch.int16).unsqueeze(0),
                "rand": rand.view(1, SEQ, len(lg), k).to(torch.int16),
            }
        )

    routers = [layer.mlp.router for layer in unwrap(model).decoder.layers]
    maps: list = []
    hooks = [r.register_forward_hook(lambda _m, _i, o: maps.append(o[1].clone())) for r in routers]

    def forward(kind):
        logits, seen, agree = [], [], RouteAgreement()
        for row in rows:
            batch = {**row, "routed_experts": row[kind]} if kind else row
            maps.clear()
            with torch.no_grad(), recorded_routing(model, batch, replay=kind is not None, agreement=agree):
                logits.append(model_forward(model, batch))
            seen.append(list(maps))
        return logits, seen, agree.metrics(group=torch.distributed.group.WORLD)

    model.eval()
    res = {"plain": forward(None), "own": forward("own"), "rand": forward("rand")}
    for h in hooks:
        h.remove()
    res["wanted_rand"] = [row["rand"] for row in rows]
    model.train()

    def step(kind, data_iterator, m):
        batch = next(data_iterator)
        batch = {**batch, "routed_experts": batch[kind]} if kind else batch
        with recorded_routing(m, batch, replay=kind is not None):
            out = model_forward(m, batch, labels=batch["labels"])
        return out, partial(sft_loss, batch["loss_mask"])

    router_w = routers[0].weight.detach().clone()
    opt, sched = build_optimizer(cfg, chunks)
    for kind in ("own", None, "rand"):  # the same weights for the first two: Adam's first step is lr*sign
        r = train_step(chunks, opt, sched, partial(step, kind), rows, seq_length=SEQ, micro_batch_size=1)
        res[f"train_{kind}"] = {"loss": r.loss, "grad_norm": r.grad_norm}
        if kind == "own":  # undo the step, so that the plain step starts from the same weights
            res["router_moved_own"] = float((routers[0].weight.detach() - router_w).abs().max())
            load_hf_into_model(chunks, hf_dir, cfg)
            opt, sched = build_optimizer(cfg, chunks)
    res["replay_left_over"] = [r.router_replay.target_topk_idx is not None for r in routers]
    destroy_parallel()
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing_replay")
    hf_dir = make_hf_dir("qwen3_moe", tmp / "hf")
    return run_ranks(_worker, 2, args=(str(hf_dir), str(tmp / "runs")), timeout=300)


def test_replaying_the_models_own_routing_changes_nothing(results):
    import torch

    for r in results:
        (plain, _, _), (own, _, agree) = r["plain"], r["own"]
        for a, b in zip(plain, own):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert agree == {"moe/route_agreement": pytest.approx(1.0)}
        assert r["train_own"]["loss"] == pytest.approx(r["train_None"]["loss"], rel=1e-6)
        assert r["train_own"]["grad_norm"] == pytest.approx(r["train_None"]["grad_norm"], rel=1e-5)
        assert not any(r["replay_left_over"])  # nothing stays armed after a forward


def test_replaying_a_random_routing_routes_there(results):
    import torch

    for r in results:
        (plain, _, _), (rand, seen, agree) = r["plain"], r["rand"]
        for row_maps, want in zip(seen, r["wanted_rand"]):  # want: [1, SEQ, layers, k]
            assert len(row_maps) == want.shape[2]
            for layer, got in enumerate(row_maps):  # routing_map [SEQ, E] bool
                exp = torch.zeros_like(got).scatter(1, want[0, :, layer].long(), True)
                assert torch.equal(got, exp), layer
        assert max(float((a - b).abs().max()) for a, b in zip(plain, rand)) > 1e-3
        # a random pair of 2 of 4 experts is the model's pair 1 time in 6
        assert agree["moe/route_agreement"] < 0.5


def test_the_router_is_trained_under_replay(results):
    for r in results:
        assert r["router_moved_own"] > 1e-4
        for key in ("train_own", "train_rand"):
            assert r[key]["loss"] == r[key]["loss"] and r[key]["grad_norm"] > 0  # finite, nonzero
