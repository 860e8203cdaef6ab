"""Checkpoints of the distributed optimizer on 2 real gloo ranks (every GPU example uses it).

megatron-core 0.16.1's distributed optimizer saves nothing unless told its format: its default is a
deprecated one that its own checkpointing refuses. Checked, for a dense model at DP=2 and a MoE
model at EP=2 (two chained optimizers, dense and experts):

* ``dp_reshardable``: a run saved after 2 steps and resumed (weights, Adam states, scheduler) trains
  steps 3 and 4 with the losses of the run that went on; weights alone (fresh Adam states) do not
  (the control); resuming it at TP=2 is refused with a message naming both layouts;
* ``fully_reshardable``: the same exact resume at DP=2, and the checkpoint resumes at TP=2 (DP=1)
  with the continuing run's losses (to reduction order);
* a checkpoint of one format is refused by a run configured for the other.
"""

from __future__ import annotations

import pytest

from tests.dist.harness import run_ranks

pytestmark = pytest.mark.dist

VOCAB, SEQ = 200, 16


def _cfg(tmp: str, *, tp: int = 1, fmt: str = "dp_reshardable", moe: bool = False):
    from megatron_t1.config import config_from_dict

    model = {
        "num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
        "num_query_groups": 2, "vocab_size": VOCAB, "max_position_embeddings": 64,
    }  # fmt: skip
    parallel = {"tensor_model_parallel_size": tp, "use_distributed_optimizer": True, "timeout_minutes": 3}
    if moe:
        model |= {"arch": "qwen3_moe", "num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 16}
        parallel |= {"expert_model_parallel_size": 2}
    return config_from_dict(
        {
            "model": model,
            "parallel": parallel,
            "data": {"seq_length": SEQ, "micro_batch_size": 1, "global_batch_size": 4},
            "optim": {"lr": 1e-2, "lr_decay_style": "constant", "lr_warmup_steps": 0, "clip_grad": 0.0},
            "run": {"train_steps": 4, "device": "cpu", "output_dir": tmp},
            "checkpoint": {"optimizer_format": fmt, "keep_last": 5},
        }
    )


def _rows(step: int):
    import torch

    g = torch.Generator().manual_seed(100 + step)
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


def _train(chunks, opt, sched, ctx, first: int, last: int) -> list[float]:
    """Steps ``first..last`` (each on its own batch); the global batch's losses."""
    from megatron_t1.mcore.forward import sft_forward_step
    from megatron_t1.mcore.train_step import train_step

    out = []
    for step in range(first, last + 1):
        rows = _rows(step)
        per = len(rows) // ctx.dp
        mine = rows[ctx.dp_rank * per : (ctx.dp_rank + 1) * per]
        res = train_step(chunks, opt, sched, sft_forward_step, mine, seq_length=SEQ, micro_batch_size=1)
        out.append(res.loss)
    return out


def _fresh(cfg):
    from megatron_t1.mcore.model import build_model
    from megatron_t1.mcore.parallel import init_parallel
    from megatron_t1.mcore.train_step import build_optimizer

    ctx = init_parallel(cfg.parallel, seed=1234, device="cpu")
    chunks = build_model(cfg)
    opt, sched = build_optimizer(cfg, chunks)
    return ctx, chunks, opt, sched


def _error(fn) -> str:
    from megatron_t1.errors import CheckpointError

    try:
        fn()
    except CheckpointError as e:
        return str(e)
    return "no error"


def _worker(rank, world, tmp):
    from megatron_t1.mcore.checkpoint import load_checkpoint, save_checkpoint

    res = {}
    for kind, moe in (("dense", False), ("moe", True)):
        for fmt in ("dp_reshardable", "fully_reshardable"):
            key, root = f"{kind}/{fmt}", f"{tmp}/{kind}_{fmt}"
            cfg = _cfg(root, fmt=fmt, moe=moe)
            ctx, chunks, opt, sched = _fresh(cfg)
            _train(chunks, opt, sched, ctx, 1, 2)
            saved = save_checkpoint(f"{root}/ckpt", 2, cfg, chunks, opt, sched)
            res[key + "/went_on"] = _train(chunks, opt, sched, ctx, 3, 4)

            ctx, chunks, opt, sched = _fresh(cfg)
            step = load_checkpoint(saved, cfg, chunks, opt, sched)["step"]
            res[key + "/resumed"] = (step, _train(chunks, opt, sched, ctx, 3, 4))

            ctx, chunks, opt, sched = _fresh(cfg)
            load_checkpoint(saved, cfg, chunks, weights_only=True)
            res[key + "/weights_only"] = _train(chunks, opt, sched, ctx, 3, 4)

            other = "fully_reshardable" if fmt == "dp_reshardable" else "dp_reshardable"
            ocfg = _cfg(root, fmt=other, moe=moe)
            ctx, chunks, opt, sched = _fresh(ocfg)
            res[key + "/other_format"] = _error(lambda: load_checkpoint(saved, ocfg, chunks, opt, sched))

            if not moe:  # TP=2 (DP=1) on the same 2 ranks
                tcfg = _cfg(root, tp=2, fmt=fmt)
                ctx, chunks, opt, sched = _fresh(tcfg)
                if fmt == "dp_reshardable":
                    res[key + "/tp2"] = _error(lambda: load_checkpoint(saved, tcfg, chunks, opt, sched))
                else:
                    load_checkpoint(saved, tcfg, chunks, opt, sched)
                    res[key + "/tp2"] = _train(chunks, opt, sched, ctx, 3, 4)
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("distopt"))
    r0, r1 = run_ranks(_worker, 2, args=(tmp,), timeout=400)
    assert r0 == r1  # the losses are the global batch's; the errors the same on both ranks
    return r0


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("fmt", ["dp_reshardable", "fully_reshardable"])
def test_resume_continues_the_run_and_weights_alone_do_not(results, kind, fmt):
    key = f"{kind}/{fmt}"
    went_on = results[key + "/went_on"]
    step, resumed = results[key + "/resumed"]
    assert step == 2
    assert resumed == pytest.approx(went_on, rel=1e-6, abs=0.0)
    # step 3's loss comes from the weights alone; step 4's depends on the Adam states of step 3's update
    fresh = results[key + "/weights_only"]
    assert fresh[0] == pytest.approx(went_on[0], rel=1e-6)
    assert abs(fresh[1] - went_on[1]) > 1e-4 * abs(went_on[1])


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("fmt", ["dp_reshardable", "fully_reshardable"])
def test_a_checkpoint_of_another_format_is_refused(results, kind, fmt):
    msg = results[f"{kind}/{fmt}/other_format"]
    assert f"checkpoint.optimizer_format={fmt}" in msg and "this run uses" in msg, msg


def test_dp_reshardable_refuses_another_tp_and_fully_reshardable_reshards(results):
    msg = results["dense/dp_reshardable/tp2"]
    assert "saved at TP=1 PP=1 EP=1" in msg and "this run is TP=2 PP=1 EP=1" in msg, msg
    tp2 = results["dense/fully_reshardable/tp2"]
    assert tp2 == pytest.approx(results["dense/fully_reshardable/went_on"], rel=1e-5)
