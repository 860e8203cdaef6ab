"""Megatron-Core on 2 real gloo ranks: TP=2, PP=2 and DP=2 agree with each other and with a plain
float64 reference; checkpoints move between layouts; DP replicas stay identical.

The model has Qwen3's per-head q/k norms and a head_dim (32) that is not hidden / heads (16): each TP
rank sees only its own heads, so the q/k-norm gradients must be summed over TP to train as DP does.

All layouts run inside ONE spawn (process start and `import megatron.core` cost ~7 s): the ranks
re-initialise Megatron's parallel groups for each layout and pass weights through checkpoints.
"""

from __future__ import annotations

import pytest

from tests.dist.harness import run_ranks

pytestmark = pytest.mark.dist

VOCAB = 250  # not a multiple of 128 x TP: exercises vocabulary padding
SEQ = 32
# Very uneven loss-token counts per row: a mean of per-row means differs from the token mean.
MASK_LENS = [2, 30, 5, 20]


def _cfg(tp: int, pp: int, tmp: str):
    from megatron_t1.config import config_from_dict

    return config_from_dict(
        {
            "model": {
                "num_layers": 2,
                "hidden_size": 64,
                "ffn_hidden_size": 128,
                "num_attention_heads": 4,
                "num_query_groups": 2,
                "kv_channels": 32,
                "qk_layernorm": True,
                "vocab_size": VOCAB,
                "max_position_embeddings": 64,
                "tie_word_embeddings": True,
            },
            "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
            "data": {"seq_length": SEQ, "micro_batch_size": 1, "global_batch_size": 4},
            "optim": {"lr": 1e-2, "lr_decay_style": "constant", "clip_grad": 0.0},
            "run": {"train_steps": 10, "device": "cpu", "output_dir": tmp},
            "checkpoint": {"keep_last": 5},
        }
    )


def _rows():
    import torch

    g = torch.Generator().manual_seed(7)
    toks = torch.randint(0, VOCAB, (4, SEQ + 1), generator=g)
    rows = []
    for i, n in enumerate(MASK_LENS):
        mask = torch.zeros(1, SEQ)
        mask[0, SEQ - n :] = 1.0
        rows.append(
            {
                "tokens": toks[i : i + 1, :-1],
                "labels": toks[i : i + 1, 1:],
                "loss_mask": mask,
                "position_ids": torch.arange(SEQ).unsqueeze(0),
                "attention_mask": None,
            }
        )
    return rows


def _full_logits(chunks, ctx, tokens):
    """[b, s, VOCAB] logits gathered over TP; through a hand-written 2-stage pipeline for PP=2."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_t1.mcore.model import unwrap

    model = unwrap(chunks[0])
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        if ctx.pp > 1:
            grp = ps.get_pipeline_model_parallel_group()
            ranks = dist.get_process_group_ranks(grp)
            if ctx.is_first_pp_stage:
                hidden = model(tokens, pos, None)
                dist.send(hidden.contiguous(), ranks[1], group=grp)
                out = torch.empty(tokens.shape[0], tokens.shape[1], VOCAB)
                dist.recv(out, ranks[1], group=grp)
                return out
            hidden = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size)
            dist.recv(hidden, ranks[0], group=grp)
            model.set_input_tensor(hidden)
            logits = model(tokens, pos, None)
        else:
            logits = model(tokens, pos, None)
        if ctx.tp > 1:
            parts = [torch.empty_like(logits) for _ in range(ctx.tp)]
            dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
            logits = torch.cat(parts, dim=-1)
        logits = logits[..., :VOCAB].contiguous()
        if ctx.pp > 1:
            dist.send(logits, ranks[0], group=grp)
        return logits


def _reference_loss_and_grad(chunks, rows):
    """Plain float64 token-mean CE over the whole global batch, and d loss / d final-norm weight."""
    import torch

    from megatron_t1.mcore.model import unwrap

    model = unwrap(chunks[0])
    num = torch.zeros((), dtype=torch.float64)
    den = 0.0
    means = []
    for r in rows:
        pos = r["position_ids"]
        # Megatron's SFT cross-entropy normalises over the padded vocabulary (the padded rows are
        # part of the model), so the reference uses the same padded softmax.
        full = model(r["tokens"], pos, None).double()
        logp = torch.log_softmax(full, dim=-1).gather(-1, r["labels"].unsqueeze(-1)).squeeze(-1)
        ce = -(logp * r["loss_mask"].double()).sum()
        num = num + ce
        den += float(r["loss_mask"].sum())
        means.append(float(ce) / float(r["loss_mask"].sum()))
    loss = num / den
    weight = model.decoder.final_layernorm.weight
    (grad,) = torch.autograd.grad(loss, [weight])
    return float(loss), grad.detach().clone(), sum(means) / len(means)


def _steps(cfg, chunks, ctx, rows, n):
    import torch

    from megatron_t1.mcore.forward import sft_forward_step
    from megatron_t1.mcore.model import unwrap
    from megatron_t1.mcore.train_step import build_optimizer, train_step

    opt, sched = build_optimizer(cfg, chunks)
    per_rank = len(rows) // ctx.dp
    mine = rows[ctx.dp_rank * per_rank : (ctx.dp_rank + 1) * per_rank]
    out = []
    for _ in range(n):
        res = train_step(chunks, opt, sched, sft_forward_step, mine, seq_length=SEQ, micro_batch_size=1)
        grad = qk_grad = None
        if ctx.is_last_pp_stage:
            grad = unwrap(chunks[-1]).decoder.final_layernorm.weight.main_grad.detach().clone()
        if ctx.pp == 1:  # layer 0's q/k-norm gradients (after finalize_model_grads' TP sum)
            attn = unwrap(chunks[0]).decoder.layers[0].self_attention
            qk_grad = torch.cat(
                [attn.q_layernorm.weight.main_grad, attn.k_layernorm.weight.main_grad]
            ).clone()
        out.append((res.loss, res.grad_norm, res.tokens, grad, qk_grad))
    return out, opt, sched


def _worker(rank, world, tmp):
    import torch
    import torch.distributed as dist

    from megatron_t1.mcore.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from megatron_t1.mcore.model import build_model
    from megatron_t1.mcore.parallel import init_parallel

    rows = _rows()
    probe = torch.cat([r["tokens"] for r in rows])
    res = {}

    # -- DP=2 (TP=1, PP=1): reference values, replicas, initial checkpoint ----------------------
    cfg = _cfg(1, 1, tmp)
    ctx = init_parallel(cfg.parallel, seed=1234, device="cpu")
    chunks = build_model(cfg)
    res["init_logits"] = _full_logits(chunks, ctx, probe)
    res["ref_loss"], res["ref_grad"], res["mean_of_means"] = _reference_loss_and_grad(chunks, rows)
    save_checkpoint(f"{tmp}/init", 0, cfg, chunks)
    res["dp2"], _, _ = _steps(cfg, chunks, ctx, rows, 2)
    flat = torch.cat([p.detach().reshape(-1) for p in chunks[0].parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    res["replicas_identical"] = all(torch.equal(gathered[0], g) for g in gathered[1:])

    # -- TP=2: same logits from the same weights, same training, then save at TP=2 ---------------
    cfg = _cfg(2, 1, tmp)
    ctx = init_parallel(cfg.parallel, seed=1234, device="cpu")
    chunks = build_model(cfg)
    load_checkpoint(latest_checkpoint(f"{tmp}/init"), cfg, chunks, weights_only=True)
    res["tp2_logits"] = _full_logits(chunks, ctx, probe)
    res["tp2"], opt, sched = _steps(cfg, chunks, ctx, rows, 2)
    save_checkpoint(f"{tmp}/tp2", 2, cfg, chunks, opt, sched)
    res["tp2_trained_logits"] = _full_logits(chunks, ctx, probe)

    # -- PP=2: same logits, same training; and the TP=2 checkpoint loads here -------------------
    cfg = _cfg(1, 2, tmp)
    ctx = init_parallel(cfg.parallel, seed=1234, device="cpu")
    chunks = build_model(cfg)
    load_checkpoint(latest_checkpoint(f"{tmp}/init"), cfg, chunks, weights_only=True)
    res["pp2_logits"] = _full_logits(chunks, ctx, probe)
    res["pp2"], _, _ = _steps(cfg, chunks, ctx, rows, 2)
    load_checkpoint(latest_checkpoint(f"{tmp}/tp2"), cfg, chunks, weights_only=True)
    res["pp2_from_tp2_logits"] = _full_logits(chunks, ctx, probe)

    # -- TP=1 (DP=2) loads the TP=2 checkpoint ---------------------------------------------------
    cfg = _cfg(1, 1, tmp)
    ctx = init_parallel(cfg.parallel, seed=1234, device="cpu")
    chunks = build_model(cfg)
    load_checkpoint(latest_checkpoint(f"{tmp}/tp2"), cfg, chunks, weights_only=True)
    res["tp1_from_tp2_logits"] = _full_logits(chunks, ctx, probe)
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("layouts"))
    return run_ranks(_worker, 2, args=(tmp,), timeout=300)


def test_tp2_logits_equal_tp1(results):
    import torch

    for r in results:
        assert torch.allclose(r["tp2_logits"], r["init_logits"], atol=1e-5, rtol=0), (
            (r["tp2_logits"] - r["init_logits"]).abs().max()
        )


def test_pp2_logits_equal_pp1(results):
    import torch

    for r in results:
        assert torch.allclose(r["pp2_logits"], r["init_logits"], atol=1e-5, rtol=0)


def test_token_mean_over_global_batch_matches_float64_reference(results):
    import torch

    r0 = results[0]
    # The test can tell the two normalisations apart on this data ...
    assert abs(r0["ref_loss"] - r0["mean_of_means"]) > 1e-3
    # ... and every layout's first-step loss is the global token mean, not a mean of means.
    for layout in ("dp2", "tp2", "pp2"):
        loss, _, tokens, _, _ = r0[layout][0]
        assert tokens == sum(MASK_LENS)
        assert loss == pytest.approx(r0["ref_loss"], rel=1e-5), layout
    # DP=2 gradients (uneven tokens per rank) equal the single-process float64 gradient.
    for r in results:
        g = r["dp2"][0][3]
        assert torch.allclose(g.double(), r["ref_grad"].double(), atol=1e-6, rtol=1e-4)


def test_layouts_train_identically(results):
    import torch

    for r in results:
        for step in range(2):
            base_loss, base_norm, _, base_grad, base_qk = r["dp2"][step]
            for layout in ("tp2", "pp2"):
                loss, norm, _, grad, qk = r[layout][step]
                assert loss == pytest.approx(base_loss, rel=1e-5), (layout, step)
                assert norm == pytest.approx(base_norm, rel=1e-4), (layout, step)
                if grad is not None:
                    assert torch.allclose(grad, base_grad, atol=1e-6, rtol=1e-4), (layout, step)
                if qk is not None:
                    assert base_qk.abs().max() > 1e-4  # a real gradient to compare
                    assert torch.allclose(qk, base_qk, atol=1e-6, rtol=1e-4), (layout, step)


def test_dp_replicas_identical(results):
    assert all(r["replicas_identical"] for r in results)


def test_checkpoint_saved_at_tp2_loads_at_tp1_and_pp2(results):
    import torch

    for r in results:
        assert not torch.allclose(r["tp2_trained_logits"], r["init_logits"])  # training moved them
        assert torch.allclose(r["tp1_from_tp2_logits"], r["tp2_trained_logits"], atol=1e-5, rtol=0)
        assert torch.allclose(r["pp2_from_tp2_logits"], r["tp2_trained_logits"], atol=1e-5, rtol=0)
