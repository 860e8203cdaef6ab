"""GPU checks of long-context RL training (skipped without CUDA; run on a lent GPU machine).

- THD packed rows under TransformerEngine's attention (the cluster spec): every document's log-probs
  equal those of the document alone, up to bf16 rounding, and a dense-mask batch is refused.
- A Qwen2.5-32B-shaped layer (hidden 5120, 40 heads, 8 KV groups, ffn 27648, 152k vocabulary) runs
  one T1 step on a 17,408-token THD row with the fused output layer and full recompute; with two GPUs
  also at TP=2 with sequence parallelism. Prints the step's peak memory for bench/RESULTS.md.
"""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.gpu

needs_te = pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is None, reason="TransformerEngine not installed"
)
QWEN32_LAYER = dict(
    num_layers=1,
    hidden_size=5120,
    ffn_hidden_size=27648,
    num_attention_heads=40,
    num_query_groups=8,
    vocab_size=152064,
    tie_word_embeddings=False,
    max_position_embeddings=32768,
    rope_theta=1e6,
    precision="bf16",
    recompute="full",
)
SEQ = 17_408
RESPONSES = [(9_000, 200), (5_000, 150), (3_000, 100)]  # (tokens, prompt tokens) in one row


def _docs(vocab, lengths, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@needs_te
def test_thd_rows_under_te_attention_equal_documents_alone(tmp_path):
    import torch

    from megatron_t1.config import ConfigError, config_from_dict
    from megatron_t1.data.packing import schedule_shape
    from megatron_t1.data.rl_batch import collate_rl_rank, plan_rl_packing
    from megatron_t1.mcore.forward import model_forward
    from megatron_t1.mcore.model import attention_kind, build_model
    from megatron_t1.mcore.parallel import destroy_parallel, init_parallel
    from megatron_t1.mcore.rl_forward import compute_logprobs

    seq = 2048
    cfg = config_from_dict(
        {
            "model": {
                "num_layers": 4, "hidden_size": 512, "ffn_hidden_size": 1408, "num_attention_heads": 8,
                "num_query_groups": 2, "vocab_size": 4096, "max_position_embeddings": seq,
                "precision": "bf16",
            },
            "data": {"seq_length": seq, "micro_batch_size": 2, "global_batch_size": 2},
            "run": {"device": "cuda", "output_dir": str(tmp_path)},
        }
    )  # fmt: skip
    init_parallel(cfg.parallel, seed=1, device="cuda")
    chunks = build_model(cfg)
    assert attention_kind(chunks[0]) == "te"
    lengths = [700, 900, 448, 1500, 300, 200]
    docs = _docs(4096, lengths)
    plens = [50] * len(docs)
    plan = plan_rl_packing(lengths, seq, dp=1, micro_batch_size=2)
    mbs = collate_rl_rank(plan, 0, docs, plens, pad_id=0)
    s, b = schedule_shape("thd", seq, 2)
    packed = compute_logprobs(chunks, mbs, temperature=1.0, vocab_size=4096, seq_length=s, micro_batch_size=b)
    worst = 0.0
    for d, ids in enumerate(docs):
        n = len(ids)
        alone = {
            "tokens": torch.tensor(ids)[None],
            "labels": torch.tensor(ids[1:] + [0])[None],
            "loss_mask": torch.zeros(1, n),
            "position_ids": torch.arange(n)[None],
        }
        lp = compute_logprobs(
            chunks, [alone], temperature=1.0, vocab_size=4096, seq_length=n, micro_batch_size=1
        )
        ref = lp[0]["logprobs"][0, plens[d] - 1 : n - 1].float()
        for o, mb in zip(packed, mbs):
            sel = (mb["doc_ids"] == d).cuda() & (mb["loss_mask"] > 0).cuda()
            if sel.any():
                worst = max(worst, float((o["logprobs"][sel].float() - ref).abs().max()))
    print(f"THD under TE vs documents alone: max |d log p| = {worst:.4f} (bf16)")
    assert worst < 0.05  # bf16 activations; a document leaking into another moves log-probs by ~1
    with pytest.raises(ConfigError, match="te core attention"):
        model_forward(chunks[0], collate_rl_rank(plan, 0, docs, plens, pad_id=0, layout="mask")[0])
    destroy_parallel()


def _layer_step(tmp, tp: int, sp: bool) -> dict:
    from megatron_t1.config import config_from_dict
    from megatron_t1.mcore.parallel import destroy_parallel, init_parallel
    from tests.dist.test_long_context import one_rl_step

    cfg = config_from_dict(
        {
            "model": QWEN32_LAYER,
            "parallel": {"tensor_model_parallel_size": tp, "sequence_parallel": sp,
                         "use_distributed_optimizer": True},
            "data": {"seq_length": SEQ, "micro_batch_size": 1, "global_batch_size": 1},
            "optim": {"lr": 1.5e-6},
            "loss": {"fused_output_layer": True},
            "rollout": {"temperature": 1.2},
            "run": {"device": "cuda", "output_dir": str(tmp)},
        }
    )  # fmt: skip
    init_parallel(cfg.parallel, seed=3, device="cuda")
    res = one_rl_step(cfg, _docs(cfg.model.vocab_size, [n for n, _ in RESPONSES]), [p for _, p in RESPONSES])
    destroy_parallel()
    return res


def test_32b_shaped_layer_runs_a_17k_token_step(tmp_path):
    r = _layer_step(tmp_path, tp=1, sp=False)
    print(f"32B-shaped layer, 17,408-token THD row, fused, TP=1: {r}")
    assert not r["skipped"] and r["grad_norm"] > 0


def _sp_worker(rank, world, tmp):
    return _layer_step(tmp, tp=2, sp=True)


def test_32b_shaped_layer_with_sequence_parallel_on_two_gpus(tmp_path):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from tests.dist.harness import run_ranks

    res = run_ranks(_sp_worker, 2, args=(str(tmp_path),), timeout=900)
    print(f"32B-shaped layer, 17,408-token THD row, fused, TP=2 + SP: {res[0]}")
    assert all(not r["skipped"] and r["grad_norm"] > 0 for r in res)
    assert res[0]["loss"] == pytest.approx(res[1]["loss"])
