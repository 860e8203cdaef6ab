"""The T1 objective wired into Megatron-Core at TP=2 (2 gloo ranks): the step's loss equals a plain
float64 reference on the gathered logits, the anchor's schedule (reset, EMA), its log-prob pass
through swapped weights, and its save / load across TP layouts."""

from __future__ import annotations

import pytest

from tests.dist.harness import run_ranks

pytestmark = pytest.mark.dist

VOCAB = 250
SEQ = 24
TAU = 1.2
ALPHA = 1e-2  # a visible entropy term


def _cfg(tp, tmp, anchor, fused=False):
    from megatron_t1.config import config_from_dict

    return config_from_dict(
        {
            "model": {
                "num_layers": 2,
                "hidden_size": 64,
                "ffn_hidden_size": 128,
                "num_attention_heads": 4,
                "num_query_groups": 2,
                "vocab_size": VOCAB,
                "max_position_embeddings": 64,
            },
            "parallel": {"tensor_model_parallel_size": tp},
            "data": {"seq_length": SEQ, "micro_batch_size": 2, "global_batch_size": 4},
            "optim": {"lr": 1e-2, "lr_decay_style": "constant", "clip_grad": 0.0},
            "run": {"train_steps": 10, "device": "cpu", "output_dir": tmp},
            "loss": {"entropy_coef": ALPHA, "fused_output_layer": fused},
            "anchor": anchor,
        }
    )


def _microbatches():
    import torch

    g = torch.Generator().manual_seed(3)
    mbs = []
    for _ in range(2):
        toks = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g)
        mask = torch.zeros(2, SEQ)
        mask[0, 10:] = 1
        mask[1, 4:20] = 1
        adv = torch.randn(2, 1, generator=g).expand(2, SEQ).contiguous()
        mbs.append(
            {
                "tokens": toks[:, :-1],
                "labels": toks[:, 1:],
                "loss_mask": mask,
                "advantages": adv,
                "position_ids": torch.arange(SEQ).expand(2, SEQ),
                "attention_mask": None,
            }
        )
    return mbs


def _gathered_logits(chunks, ctx, mb):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_t1.mcore.model import unwrap

    with torch.no_grad():
        out = unwrap(chunks[0])(mb["tokens"], mb["position_ids"], None)
        if ctx.tp > 1:
            parts = [torch.empty_like(out) for _ in range(ctx.tp)]
            dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
            out = torch.cat(parts, -1)
    return out[..., :VOCAB].double()


def _reference_loss(chunks, ctx, mbs):
    """-sum(A logp)/G - alpha sum(H)/G over the whole batch, float64, full softmax over real tokens."""
    import torch

    num = torch.zeros((), dtype=torch.float64)
    G = sum(float(m["loss_mask"].sum()) for m in mbs)
    for m in mbs:
        z = _gathered_logits(chunks, ctx, m) / TAU
        logp_all = torch.log_softmax(z, -1)
        logp = logp_all.gather(-1, m["labels"].unsqueeze(-1)).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
        mask = m["loss_mask"].double()
        num = num - (m["advantages"].double() * logp * mask).sum() - ALPHA * (ent * mask).sum()
    return float(num / G)


def _worker(rank, world, tmp):
    import torch

    from megatron_t1.mcore.anchor_store import AnchorStore
    from megatron_t1.mcore.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from megatron_t1.mcore.model import build_model
    from megatron_t1.mcore.parallel import init_parallel
    from megatron_t1.mcore.rl_forward import compute_logprobs, rl_forward_step
    from megatron_t1.mcore.train_step import build_optimizer, train_step

    res = {}
    mbs = _microbatches()
    G = int(sum(m["loss_mask"].sum() for m in mbs))

    def _t1_step(loss_config, num_tokens):
        """The forward step train_step calls: the T1 loss, token-mean over the whole batch."""
        return lambda it, m: rl_forward_step(
            it,
            m,
            loss_config=loss_config,
            temperature=TAU,
            vocab_size=VOCAB,
            global_num_tokens=num_tokens,
            global_num_seqs=None,
        )

    lp_kw = dict(temperature=TAU, vocab_size=VOCAB, seq_length=SEQ, micro_batch_size=2)

    cfg = _cfg(2, tmp, {"ema": None, "reset_every": 1})
    ctx = init_parallel(cfg.parallel, seed=11, device="cpu")
    chunks = build_model(cfg)
    opt, sched = build_optimizer(cfg, chunks)
    anchor = AnchorStore(chunks, cfg.anchor)
    ema = AnchorStore(chunks, type(cfg.anchor)(ema=0.99, reset_every=None))
    ema0 = AnchorStore(chunks, type(cfg.anchor)(ema=0.0, reset_every=None))
    res["ref_loss"] = _reference_loss(chunks, ctx, mbs)
    before = [t.clone() for t in ema.tensors]
    step = train_step(
        chunks,
        opt,
        sched,
        _t1_step(cfg.loss, G),
        mbs,
        seq_length=SEQ,
        micro_batch_size=2,
    )
    res["step_loss"] = step.loss
    res["step_entropy"] = step.metrics.get("entropy")
    policy = [p.detach().clone() for p in anchor.policy_tensors()]
    res["weights_moved"] = any(not torch.equal(a, p) for a, p in zip(anchor.tensors, policy))

    # Anchor still at the initial weights: its log-probs differ from the policy's.
    pol_lp = compute_logprobs(chunks, mbs, **lp_kw)
    with anchor.swapped_in():
        anc_lp = compute_logprobs(chunks, mbs, **lp_kw)
    res["kl_before_reset"] = max(
        float((a["logprobs"] - p["logprobs"]).abs().max()) for a, p in zip(anc_lp, pol_lp)
    )
    res["swap_restored"] = all(torch.equal(p, q) for p, q in zip(anchor.policy_tensors(), policy))
    # reset_every=1: after step 1 the anchor is the policy -> KL exactly zero.
    res["action"] = anchor.update(1)
    with anchor.swapped_in():
        anc_lp = compute_logprobs(chunks, mbs, **lp_kw)
    res["kl_after_reset"] = max(
        float((a["logprobs"] - p["logprobs"]).abs().max()) for a, p in zip(anc_lp, pol_lp)
    )
    # EMA with a = 0 equals a reset; a = 0.99 is the convex combination (float64 check).
    ema0.update(1)
    res["ema0_equals_reset"] = all(torch.equal(a, b) for a, b in zip(ema0.tensors, anchor.tensors))
    ema.update(1)
    res["ema_err"] = max(
        float((a.double() - (0.99 * b.double() + 0.01 * p.double())).abs().max())
        for a, b, p in zip(ema.tensors, before, policy)
    )
    res["ema_dtype"] = str(ema.tensors[0].dtype)

    # Save the EMA anchor with the policy; perturb; load: restored exactly. Then reload at TP=1.
    save_checkpoint(
        f"{tmp}/ck", 1, cfg, chunks, opt, sched, extra_sharded={"anchor": ema.sharded_state_dict()}
    )
    saved = [t.clone() for t in ema.tensors]
    for t in ema.tensors:
        t.add_(1.0)
    out = load_checkpoint(
        latest_checkpoint(f"{tmp}/ck"),
        cfg,
        chunks,
        opt,
        sched,
        extra_sharded={"anchor": ema.sharded_state_dict()},
    )
    ema.load_from(out["anchor"])
    res["anchor_restored"] = all(torch.equal(a, b) for a, b in zip(ema.tensors, saved))
    with ema.swapped_in():
        lp_tp2 = compute_logprobs(chunks, mbs, **lp_kw)

    # The fused output layer (hidden states + weight, no [T, V] logits) gives the same step.
    cfgf = _cfg(2, tmp, {"ema": 0.99}, fused=True)
    ctx = init_parallel(cfgf.parallel, seed=11, device="cpu")
    chunksf = build_model(cfgf)
    optf, schedf = build_optimizer(cfgf, chunksf)
    res["fused_ref_loss"] = _reference_loss(chunksf, ctx, mbs)
    stepf = train_step(
        chunksf,
        optf,
        schedf,
        _t1_step(cfgf.loss, G),
        mbs,
        seq_length=SEQ,
        micro_batch_size=2,
    )
    res["fused_step_loss"] = stepf.loss
    res["fused_grad_norm"], res["plain_grad_norm"] = stepf.grad_norm, step.grad_norm

    cfg1 = _cfg(1, tmp, {"ema": 0.99})
    ctx = init_parallel(cfg1.parallel, seed=11, device="cpu")
    chunks1 = build_model(cfg1)
    ema1 = AnchorStore(chunks1, cfg1.anchor)
    out = load_checkpoint(
        latest_checkpoint(f"{tmp}/ck"),
        cfg1,
        chunks1,
        weights_only=True,
        extra_sharded={"anchor": ema1.sharded_state_dict()},
    )
    ema1.load_from(out["anchor"])
    with ema1.swapped_in():
        lp_tp1 = compute_logprobs(chunks1, mbs, **lp_kw)
    res["anchor_tp2_vs_tp1"] = max(
        float((a["logprobs"] - b["logprobs"]).abs().max()) for a, b in zip(lp_tp1, lp_tp2)
    )
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_worker, 2, args=(str(tmp_path_factory.mktemp("rl")),), timeout=240)


def test_step_loss_equals_float64_reference(results):
    for r in results:
        assert r["step_loss"] == pytest.approx(r["ref_loss"], rel=1e-5, abs=1e-6)
        assert r["step_entropy"] is not None and r["step_entropy"] > 0
        assert r["weights_moved"]


def test_fused_output_layer_step_equals_reference_and_plain(results):
    for r in results:
        assert r["fused_ref_loss"] == pytest.approx(r["ref_loss"], rel=1e-12)  # same initial weights
        assert r["fused_step_loss"] == pytest.approx(r["ref_loss"], rel=1e-5, abs=1e-6)
        assert r["fused_grad_norm"] == pytest.approx(r["plain_grad_norm"], rel=1e-4)


def test_anchor_reset_gives_zero_kl_and_swap_restores_policy(results):
    for r in results:
        assert r["kl_before_reset"] > 1e-4
        assert r["action"] == "reset"
        assert r["kl_after_reset"] == 0.0
        assert r["swap_restored"]


def test_ema(results):
    for r in results:
        assert r["ema0_equals_reset"]
        assert r["ema_err"] < 1e-6
        assert r["ema_dtype"] == "torch.float32"


def test_anchor_survives_save_load_and_reshards(results):
    for r in results:
        assert r["anchor_restored"]
        assert r["anchor_tp2_vs_tp1"] < 1e-5
