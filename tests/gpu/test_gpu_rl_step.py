"""One T1 RL step (trainer side) of a Qwen2.5-0.5B-shaped policy in bf16 on one GPU.

Rollouts are stand-ins (random response tokens with random 0/1 rewards): this checks the trainer's
path at real vocabulary and width: the fp32 EMA anchor's log-prob pass through swapped weights,
k1 KL per response, RLOO advantages over KL-shaped rewards, the T1 loss with the entropy bonus under
the sampling temperature, one optimizer step, and the anchor update. The rollout engine has its own
tests.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

QWEN05 = dict(
    num_layers=24,
    hidden_size=896,
    ffn_hidden_size=4864,
    num_attention_heads=14,
    num_query_groups=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
    rope_theta=1e6,
    precision="bf16",
)


def test_one_rl_step_qwen05_shape(tmp_path):
    import torch

    from megatron_t1.config import config_from_dict
    from megatron_t1.mcore.anchor_store import AnchorStore
    from megatron_t1.mcore.model import build_model
    from megatron_t1.mcore.parallel import init_parallel
    from megatron_t1.mcore.rl_forward import compute_logprobs, rl_forward_step
    from megatron_t1.mcore.train_step import build_optimizer, train_step
    from megatron_t1.rl.advantage import t1_advantages

    prompts, k, seq = 4, 8, 1024
    cfg = config_from_dict(
        {
            "model": QWEN05,
            "data": {"seq_length": seq, "micro_batch_size": 4, "global_batch_size": prompts * k},
            "optim": {"lr": 1.5e-6},
            "run": {"train_steps": 10, "device": "cuda", "output_dir": str(tmp_path)},
            "rollout": {"n_samples": k, "temperature": 1.2},
        }
    )
    init_parallel(cfg.parallel, seed=3, device="cuda")
    chunks = build_model(cfg)
    opt, sched = build_optimizer(cfg, chunks)
    anchor = AnchorStore(chunks, cfg.anchor)  # EMA 0.99, fp32
    assert anchor.tensors[0].dtype == torch.float32

    g = torch.Generator().manual_seed(0)
    n = prompts * k
    toks = torch.randint(0, cfg.model.vocab_size, (n, seq + 1), generator=g)
    prompt_len = 128
    resp_len = torch.randint(64, seq - prompt_len, (n,), generator=g)
    mask = torch.zeros(n, seq)
    for i in range(n):
        mask[i, prompt_len : prompt_len + resp_len[i]] = 1
    rewards = torch.randint(0, 2, (prompts, k), generator=g).float()

    def mbs(adv=None):
        out = []
        for s in range(0, n, 4):
            b = {
                "tokens": toks[s : s + 4, :-1].cuda(),
                "labels": toks[s : s + 4, 1:].cuda(),
                "loss_mask": mask[s : s + 4].cuda(),
                "position_ids": torch.arange(seq).expand(4, seq).cuda(),
                "attention_mask": None,
            }
            if adv is not None:
                b["advantages"] = adv[s : s + 4].unsqueeze(1).expand(4, seq).contiguous().cuda()
            out.append(b)
        return out

    lp_kw = dict(temperature=1.2, vocab_size=cfg.model.vocab_size, seq_length=seq, micro_batch_size=4)
    torch.cuda.reset_peak_memory_stats()
    pol = compute_logprobs(chunks, mbs(), **lp_kw)
    with anchor.swapped_in():
        anc = compute_logprobs(chunks, mbs(), **lp_kw)
    logp = torch.cat([p["logprobs"] for p in pol])
    logp_ref = torch.cat([a["logprobs"] for a in anc])
    kl = ((logp - logp_ref) * mask.cuda()).sum(-1).view(prompts, k)  # k1 per response, summed
    assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-3)  # anchor starts at the policy
    adv = t1_advantages(rewards.cuda(), kl, beta=cfg.loss.kl_coef).reshape(-1)
    G = int(mask.sum())
    res = train_step(
        chunks,
        opt,
        sched,
        lambda it, m: rl_forward_step(
            it,
            m,
            loss_config=cfg.loss,
            temperature=1.2,
            vocab_size=cfg.model.vocab_size,
            global_num_tokens=G,
            global_num_seqs=None,
        ),
        mbs(adv),
        seq_length=seq,
        micro_batch_size=4,
    )
    peak = torch.cuda.max_memory_allocated() / 2**30
    assert not res.skipped and torch.isfinite(torch.tensor(res.loss)) and res.grad_norm > 0
    assert 0 < res.metrics["entropy"] <= float(torch.log(torch.tensor(float(cfg.model.vocab_size))))
    before = [t.clone() for t in anchor.tensors[:4]]
    assert anchor.update(1) == "ema"
    moved = max(float((a - b).abs().max()) for a, b in zip(anchor.tensors[:4], before))
    assert moved > 0
    print(
        f"rl step: loss {res.loss:.4f} grad_norm {res.grad_norm:.3f} entropy {res.metrics['entropy']:.3f} "
        f"peak {peak:.1f} GiB tokens {G}"
    )
