"""GPU checks of the Megatron-Core policy (skipped without CUDA; run on a lent GPU machine).

bf16 with fp32 master weights, the distributed optimizer against the plain one, checkpoints on
GPU, and TransformerEngine's layer spec when TE is installed.
"""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.gpu


def _cfg(tmp, **over):
    from megatron_t1.config import config_from_dict

    tree = {
        "model": {
            "num_layers": 4,
            "hidden_size": 256,
            "ffn_hidden_size": 704,
            "num_attention_heads": 8,
            "num_query_groups": 2,
            "vocab_size": 1000,
            "max_position_embeddings": 512,
        },
        "data": {"seq_length": 256, "micro_batch_size": 4, "global_batch_size": 8},
        "optim": {"lr": 1e-3, "lr_decay_style": "constant"},
        "run": {"train_steps": 30, "output_dir": str(tmp), "device": "cuda"},
    }
    for k, v in over.items():
        sec, key = k.split("__")
        tree.setdefault(sec, {})[key] = v
    return config_from_dict(tree)


def _batch(cfg, device, n=2, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    s, b = cfg.data.seq_length, cfg.data.micro_batch_size
    out = []
    for _ in range(n):
        t = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=g)
        out.append(
            {
                "tokens": t[:, :-1].to(device),
                "labels": t[:, 1:].to(device),
                "loss_mask": torch.ones(b, s, device=device),
                "position_ids": torch.arange(s, device=device).expand(b, s),
                "attention_mask": None,
            }
        )
    return out


def _train(cfg, steps):
    from megatron_t1.mcore.forward import sft_forward_step
    from megatron_t1.mcore.model import build_model
    from megatron_t1.mcore.parallel import init_parallel
    from megatron_t1.mcore.train_step import build_optimizer, train_step

    ctx = init_parallel(cfg.parallel, seed=5, device="cuda")
    chunks = build_model(cfg)
    opt, sched = build_optimizer(cfg, chunks)
    mbs = _batch(cfg, ctx.device)
    losses = [
        train_step(
            chunks, opt, sched, sft_forward_step, mbs, seq_length=cfg.data.seq_length, micro_batch_size=4
        ).loss
        for _ in range(steps)
    ]
    return losses, chunks, opt, sched


def test_bf16_learns_with_fp32_master_weights(tmp_path):
    import torch

    cfg = _cfg(tmp_path, model__precision="bf16")
    losses, chunks, opt, _ = _train(cfg, 30)
    params = list(chunks[0].parameters())
    assert all(p.dtype == torch.bfloat16 and p.is_cuda for p in params)
    masters = [p for g in opt.optimizer.param_groups for p in g["params"]]
    assert masters and all(p.dtype == torch.float32 for p in masters)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses  # memorises the fixed batch


def test_distributed_optimizer_matches_plain(tmp_path):
    plain, *_ = _train(_cfg(tmp_path / "a"), 5)
    dist_opt, *_ = _train(_cfg(tmp_path / "b", parallel__use_distributed_optimizer=True), 5)
    for a, b in zip(plain, dist_opt):
        assert b == pytest.approx(a, rel=1e-4)


def test_checkpoint_round_trip_on_gpu(tmp_path):
    from megatron_t1.mcore.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from megatron_t1.mcore.forward import sft_forward_step
    from megatron_t1.mcore.train_step import train_step

    cfg = _cfg(tmp_path, model__precision="bf16")
    _, chunks, opt, sched = _train(cfg, 3)
    save_checkpoint(tmp_path / "ck", 3, cfg, chunks, opt, sched)
    mbs = _batch(cfg, "cuda", seed=1)
    a = train_step(chunks, opt, sched, sft_forward_step, mbs, seq_length=256, micro_batch_size=4).loss
    assert load_checkpoint(latest_checkpoint(tmp_path / "ck"), cfg, chunks, opt, sched)["step"] == 3
    b = train_step(chunks, opt, sched, sft_forward_step, mbs, seq_length=256, micro_batch_size=4).loss
    assert b == pytest.approx(a, rel=1e-3)


@pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is None, reason="TransformerEngine not installed"
)
def test_transformer_engine_spec_is_used_and_learns(tmp_path):
    from megatron_t1.mcore.model import te_available

    assert te_available()
    losses, chunks, *_ = _train(_cfg(tmp_path, model__precision="bf16"), 20)
    names = [n for n, _ in chunks[0].named_parameters()]
    assert any("layer_norm_weight" in n for n in names)  # TE fuses the norms into the linears
    assert losses[-1] < losses[0]


def test_sdpa_core_attention_matches_megatron_in_bf16_and_saves_memory(tmp_path):
    """The default SDPA core attention (flash kernels on GPU) against Megatron's unfused one: the same
    weights give the same loss and gradients up to bf16 rounding, with less activation memory."""
    import torch

    from megatron_t1.mcore.forward import sft_forward_step
    from megatron_t1.mcore.model import build_model
    from megatron_t1.mcore.parallel import destroy_parallel, init_parallel
    from megatron_t1.mcore.train_step import build_optimizer, train_step

    runs = {}
    for core in ("megatron", "sdpa"):
        cfg = _cfg(
            tmp_path / core,
            model__precision="bf16",
            model__core_attention=core,
            data__seq_length=2048,
            data__micro_batch_size=2,
            data__global_batch_size=2,
            model__max_position_embeddings=2048,
        )
        init_parallel(cfg.parallel, seed=5, device="cuda")  # same seed -> same initial weights
        chunks = build_model(cfg)
        opt, sched = build_optimizer(cfg, chunks)
        mbs = _batch(cfg, "cuda", n=1)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res = train_step(chunks, opt, sched, sft_forward_step, mbs, seq_length=2048, micro_batch_size=2)
        peak = torch.cuda.max_memory_allocated() - base
        runs[core] = (res.loss, res.grad_norm, peak)
        del chunks, opt, sched
        destroy_parallel()
        torch.cuda.empty_cache()
    (l_m, g_m, p_m), (l_s, g_s, p_s) = runs["megatron"], runs["sdpa"]
    print(
        f"sdpa vs megatron: loss {l_s:.5f} / {l_m:.5f}, grad norm {g_s:.4f} / {g_m:.4f}, "
        f"step peak {p_s / 2**20:.0f} / {p_m / 2**20:.0f} MiB"
    )
    assert l_s == pytest.approx(l_m, rel=2e-3)
    assert g_s == pytest.approx(g_m, rel=2e-2)
    assert p_s < 0.8 * p_m  # no [b, heads, s, s] scores kept for backward
