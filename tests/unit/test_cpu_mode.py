"""megatron_t1.mcore.cpu: the CPU patches, and hiding a GPU for ``run.device: cpu`` on a GPU box.

Each case runs in a fresh interpreter: the patches are process-wide and permanent by design.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


def test_force_hides_a_visible_gpu_and_megatron_rope_stays_on_cpu():
    # Pretend CUDA exists (as on a GPU box): without force nothing is patched; with force the process
    # sees no GPU and Megatron's RoPE (which moves its frequencies to torch.cuda.current_device() at
    # the first forward) computes on the CPU.
    out = _run(
        """
        import torch
        torch.cuda.is_available = lambda: True
        from megatron_t1.mcore.cpu import enable_cpu_mode
        first = enable_cpu_mode()
        second = enable_cpu_mode(force=True)
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
        rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)
        emb = rope(16)
        x = torch.zeros(2, device="cuda")
        print(first, second, torch.cuda.is_available(), emb.device.type, tuple(emb.shape), x.device.type)
        """
    )
    assert out == "False True False cpu (16, 1, 1, 8) cpu"


def test_init_parallel_on_cpu_forces_cpu_mode():
    out = _run(
        """
        import torch
        torch.cuda.is_available = lambda: True  # a GPU box
        from megatron_t1.config import ParallelConfig
        from megatron_t1.mcore.parallel import destroy_parallel, init_parallel
        ctx = init_parallel(ParallelConfig(), seed=1, device="cpu")
        print(ctx.device.type, torch.cuda.is_available())
        destroy_parallel()
        """
    )
    assert out == "cpu False"


def test_moe_gpt_model_trains_on_cpu_and_routes_as_qwen3_moe():
    """Megatron-Core's MoE layer (top-k softmax router, alltoall dispatcher, SequentialMLP experts)
    runs forward and backward on a CPU-only torch (patch 9 of mcore/cpu.py: its router gating needs
    ``te_general_gemm`` defined); every expert and the router get gradients. The router's weights
    equal Qwen3-MoE's, written the textbook way in float64 (softmax over all experts, top k, and with
    ``norm_topk_prob`` the k weights divided by their sum), for both settings of the flag."""
    out = _run(
        """
        import torch
        from megatron_t1.config import config_from_dict
        from megatron_t1.mcore.model import build_model, transformer_config
        from megatron_t1.mcore.parallel import destroy_parallel, init_parallel

        res = []
        for norm in (True, False):
            cfg = config_from_dict({
                "model": {"arch": "qwen3_moe", "num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64,
                          "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 16,
                          "qk_layernorm": True, "add_qkv_bias": False, "vocab_size": 100,
                          "max_position_embeddings": 64, "num_experts": 4, "moe_router_topk": 2,
                          "moe_ffn_hidden_size": 16, "norm_topk_prob": norm, "moe_aux_loss_coeff": 0.01},
                "data": {"seq_length": 16, "micro_batch_size": 1, "global_batch_size": 1},
                "run": {"device": "cpu"},
            })
            tc = transformer_config(cfg)
            assert tc.moe_router_pre_softmax is (not norm) and tc.moe_token_dispatcher_type == "alltoall"
            init_parallel(cfg.parallel, seed=0, device="cpu")
            model = build_model(cfg, wrap_ddp=False)[0]
            tok = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
            logits = model(tok, torch.arange(16).expand(2, 16), attention_mask=None)
            logits.float().pow(2).mean().backward()
            mlp = model.decoder.layers[0].mlp
            grads = [p.grad for n, p in mlp.named_parameters()]
            ok = all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)

            router = mlp.router
            x = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                probs, routing_map = router(x)
            logit64 = x.reshape(-1, 32).double() @ router.weight.double().t()
            p = torch.softmax(logit64, -1)
            top, idx = p.topk(2, dim=-1)
            if norm:
                top = top / top.sum(-1, keepdim=True)
            want = torch.zeros_like(p).scatter(1, idx, top)
            err = (probs.double() - want).abs().max().item()
            mask_ok = torch.equal(routing_map, want > 0)
            res.append(f"{len(grads)} {ok} {mask_ok} {err < 1e-6} {type(mlp.experts).__name__}")
            destroy_parallel()
        # model.moe_grouped_gemm: null falls back to one GEMM per expert here (above); true refuses
        cfg.model.moe_grouped_gemm = True
        try:
            transformer_config(cfg)
            res.append("built")
        except Exception as e:
            res.append(f"{type(e).__name__}: {'GroupedLinear' in str(e) and 'no GPU' in str(e)}")
        print(" | ".join(res))
        """
    )
    assert out == ("9 True True True SequentialMLP | 9 True True True SequentialMLP | ConfigError: True")
