"""Long-context training pieces at TP=2 on 2 gloo ranks: THD packed rows (``cu_seqlens``, no [S, S]
mask) give every document the log-probs and entropies it has alone; sequence parallelism leaves the
fused T1 loss, its gradients and the log-prob passes unchanged; the SFT loss on the demo data is the
same in the THD and the dense-mask layouts."""

from __future__ import annotations

import math

import pytest

from tests.dist.harness import run_ranks

pytestmark = pytest.mark.dist

VOCAB = 320
SEQ = 48
TAU = 1.2
# fp32 tolerances: a packed document and the same document alone differ only in summation order
LOGP_ATOL = 1e-5
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


def _cfg(tmp, *, sp=False, fused=True, packing="auto", seq=SEQ, micro=1, core="sdpa"):
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
                "max_position_embeddings": 512,
                "core_attention": core,
            },
            "parallel": {"tensor_model_parallel_size": 2, "sequence_parallel": sp},
            "data": {
                "seq_length": seq,
                "micro_batch_size": micro,
                "global_batch_size": 2,
                "packing": packing,
            },
            "optim": {"lr": 1e-2, "lr_decay_style": "constant", "clip_grad": 0.0},
            "run": {"train_steps": 4, "device": "cpu", "output_dir": tmp},
            "loss": {"entropy_coef": 1e-2, "fused_output_layer": fused},
            "anchor": {"ema": None, "reset_every": 1},
        }
    )


def _docs():
    """Eight responses (prompt + sampled tokens), even lengths (SP alone needs length % TP == 0)."""
    import torch

    g = torch.Generator().manual_seed(5)
    lengths = [30, 18, 12, 26, 8, 40, 22, 16]
    docs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]
    plens = [4, 6, 2, 8, 2, 10, 4, 6]
    return docs, plens


def _build(cfg, state=None):
    from megatron_t1.mcore.model import build_model, unwrap

    chunks = build_model(cfg)
    if state is not None:
        unwrap(chunks[0]).load_state_dict(state)
    return chunks


def _logprob_kw(cfg, sched_seq, sched_micro):
    return dict(
        temperature=TAU,
        vocab_size=VOCAB,
        seq_length=sched_seq,
        micro_batch_size=sched_micro,
        fused_output_layer=cfg.loss.fused_output_layer,
    )


def _per_doc(outputs, mbs, n_docs):
    """{doc: (logprobs, entropies)} at the trained positions, in order."""
    out = {}
    for o, mb in zip(outputs, mbs):
        m = mb["loss_mask"] > 0
        for d in range(n_docs):
            sel = m & (mb["doc_ids"] == d)
            if sel.any():
                out[d] = (o["logprobs"][sel].double(), o["entropy"][sel].double())
    return out


def _alone(docs, plens, d):
    """Document d as its own unpacked micro-batch [1, n] (plain causal attention, no packing info)."""
    import torch

    ids, p = docs[d], plens[d]
    n = len(ids)
    labels = torch.tensor(ids[1:] + [0])[None]
    mask = torch.zeros(1, n)
    mask[0, p - 1 : n - 1] = 1
    return {
        "tokens": torch.tensor(ids)[None],
        "labels": labels,
        "loss_mask": mask,
        "position_ids": torch.arange(n)[None],
        "doc_ids": torch.where(mask > 0, d, -1).long(),
    }


def _grads(chunks):
    from megatron_t1.mcore.model import unwrap

    return {n: p.main_grad.detach().clone() for n, p in unwrap(chunks[0]).named_parameters()}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _worker(rank, world, tmp, sft_dir):
    import torch

    from megatron_t1.data.packing import schedule_shape
    from megatron_t1.data.rl_batch import collate_rl_rank, plan_rl_packing
    from megatron_t1.mcore.model import unwrap
    from megatron_t1.mcore.parallel import destroy_parallel, init_parallel
    from megatron_t1.mcore.rl_forward import compute_logprobs, rl_forward_step
    from megatron_t1.mcore.train_step import build_optimizer, train_step

    res = {}
    base = _cfg(tmp)
    init_parallel(base.parallel, seed=7, device="cpu")
    docs, plens = _docs()
    n_docs = len(docs)
    plan = plan_rl_packing([len(d) for d in docs], SEQ, dp=1, micro_batch_size=2)
    advantages = torch.linspace(-1.0, 1.0, n_docs)

    def micro_batches(layout):
        mbs = collate_rl_rank(plan, 0, docs, plens, pad_id=0, layout=layout)
        for mb in mbs:
            mb["advantages"] = advantages[mb["doc_ids"].clamp(min=0)] * mb["loss_mask"]
        return mbs

    thd, mask = micro_batches("thd"), micro_batches("mask")
    res["thd_shape"] = tuple(thd[0]["tokens"].shape)
    res["thd_has_mask"] = any("attention_mask" in mb for mb in thd)
    G = sum(len(d) - p for d, p in zip(docs, plens))

    ref = _build(base)
    state = {k: v.clone() for k, v in unwrap(ref[0]).state_dict().items() if v is not None}
    # -- log-probs: packed THD (SP off / on, fused / chunked) and the dense mask vs every document alone --
    alone = {}
    for d in range(n_docs):
        o = compute_logprobs(ref, [_alone(docs, plens, d)], **_logprob_kw(base, len(docs[d]), 1))
        alone.update(_per_doc(o, [_alone(docs, plens, d)], n_docs))
    variants = {
        "thd": (base, thd, "thd"),
        "thd_sp": (_cfg(tmp, sp=True), thd, "thd"),
        "thd_sp_chunked": (_cfg(tmp, sp=True, fused=False), thd, "thd"),
        "mask": (_cfg(tmp, packing="mask"), mask, "mask"),
    }
    for name, (cfg, mbs, layout) in variants.items():
        chunks = ref if cfg is base else _build(cfg, state)
        got = _per_doc(
            compute_logprobs(chunks, mbs, **_logprob_kw(cfg, *schedule_shape(layout, SEQ, 2))), mbs, n_docs
        )
        res[f"lp_err_{name}"] = max(float((got[d][0] - alone[d][0]).abs().max()) for d in range(n_docs))
        res[f"ent_err_{name}"] = max(float((got[d][1] - alone[d][1]).abs().max()) for d in range(n_docs))
        res[f"docs_{name}"] = sorted(got)
    # the packing information matters: the same THD row as one causal sequence differs
    plain = [{k: v for k, v in mb.items() if k not in ("cu_seqlens", "max_seqlen")} for mb in thd]
    got = _per_doc(compute_logprobs(ref, plain, **_logprob_kw(base, 2 * SEQ, 1)), plain, n_docs)
    res["lp_err_unpacked"] = max(float((got[d][0] - alone[d][0]).abs().max()) for d in range(n_docs))

    # -- one T1 step: loss, metrics and gradients with SP on equal SP off (fused and chunked) --------
    def step(cfg, mbs, layout):
        chunks = _build(cfg, state)
        opt, sched = build_optimizer(cfg, chunks)
        fn = lambda it, m: rl_forward_step(  # noqa: E731
            it, m, loss_config=cfg.loss, temperature=TAU, vocab_size=VOCAB, global_num_tokens=G,
            global_num_seqs=n_docs,
        )  # fmt: skip
        s, b = schedule_shape(layout, SEQ, 2)
        out = train_step(chunks, opt, sched, fn, mbs, seq_length=s, micro_batch_size=b)
        return out, _grads(chunks)

    steps = {
        "fused": step(base, thd, "thd"),
        "fused_sp": step(_cfg(tmp, sp=True), thd, "thd"),
        "chunked": step(_cfg(tmp, fused=False), thd, "thd"),
        "chunked_sp": step(_cfg(tmp, sp=True, fused=False), thd, "thd"),
        "mask_fused": step(_cfg(tmp, packing="mask"), mask, "mask"),
    }
    ref_out, ref_grads = steps["fused"]
    res["loss"] = ref_out.loss
    for name, (out, grads) in steps.items():
        res[f"loss_rel_{name}"] = abs(out.loss - ref_out.loss) / abs(ref_out.loss)
        res[f"entropy_rel_{name}"] = abs(out.metrics["entropy"] - ref_out.metrics["entropy"]) / abs(
            ref_out.metrics["entropy"]
        )
        res[f"grad_rel_{name}"] = max(_rel(grads[n], ref_grads[n]) for n in ref_grads)
    res["norm_grad_nonzero"] = all(
        float(ref_grads[n].abs().max()) > 0 for n in ref_grads if "layernorm" in n or "final_norm" in n
    )

    # -- the layout guard on real models: a batch its core attention would get wrong is refused --------
    from megatron_t1.config import ConfigError
    from megatron_t1.mcore.forward import model_forward

    def refused(model, batch):
        try:
            model_forward(model, batch)
        except ConfigError as e:
            return str(e)
        return None

    megatron_attn = _build(_cfg(tmp, packing="mask", core="megatron"), state)
    res["guard_megatron_thd"] = refused(megatron_attn[0], thd[0])
    res["guard_megatron_mask"] = refused(megatron_attn[0], mask[0])
    res["guard_sdpa_both"] = (refused(ref[0], thd[0]), refused(ref[0], mask[0]))

    # -- SFT on the demo data: THD and the dense mask give the same loss -----------------------------
    res["sft"] = _sft_losses(tmp, sft_dir)
    destroy_parallel()
    return res


def _sft_losses(tmp, sft_dir):
    from pathlib import Path

    from transformers import AutoTokenizer

    from megatron_t1.data.packing import micro_batches, pack_sequences, schedule_shape
    from megatron_t1.data.sft import SFTDataset
    from megatron_t1.mcore.forward import sft_forward_step
    from megatron_t1.mcore.model import unwrap
    from megatron_t1.mcore.train_step import build_optimizer, forward_only, train_step

    tok = AutoTokenizer.from_pretrained(Path(sft_dir) / "tok")
    seq = 256
    rows = pack_sequences(
        SFTDataset(Path(sft_dir) / "train.jsonl", tok, max_len=seq).load(), seq, tok.pad_token_id
    )
    rows = rows[:4]
    out, state = {}, None
    for layout in ("thd", "mask"):
        cfg = _cfg(tmp, fused=False, packing=layout, seq=seq, micro=2)
        chunks = _build(cfg, state)
        if state is None:
            state = {k: v.clone() for k, v in unwrap(chunks[0]).state_dict().items() if v is not None}
        mbs = list(micro_batches(rows, 2, ignore_index=tok.pad_token_id, layout=layout))
        s, b = schedule_shape(layout, seq, 2)
        before = forward_only(chunks, sft_forward_step, mbs, seq_length=s, micro_batch_size=b)["loss"]
        opt, sched = build_optimizer(cfg, chunks)
        step = train_step(chunks, opt, sched, sft_forward_step, mbs, seq_length=s, micro_batch_size=b)
        after = forward_only(chunks, sft_forward_step, mbs, seq_length=s, micro_batch_size=b)["loss"]
        out[layout] = (before, step.loss, step.grad_norm, after)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import json

    from megatron_t1.data.synthetic import make_sft_examples
    from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer

    d = tmp_path_factory.mktemp("lc_sft")
    ex = make_sft_examples(60, seed=3)
    with open(d / "train.jsonl", "w") as f:
        for e in ex:
            f.write(json.dumps(e) + "\n")
    train_tokenizer(chat_corpus(ex), VOCAB, d / "tok")
    return run_ranks(_worker, 2, args=(str(tmp_path_factory.mktemp("lc")), str(d)), timeout=420)


def test_thd_rows_carry_no_mask(results):
    for r in results:
        assert r["thd_shape"] == (1, 2 * SEQ) and not r["thd_has_mask"]


@pytest.mark.parametrize("name", ["thd", "thd_sp", "thd_sp_chunked", "mask"])
def test_packed_documents_equal_documents_alone(results, name):
    for r in results:
        assert r[f"docs_{name}"] == list(range(8))
        assert r[f"lp_err_{name}"] <= LOGP_ATOL, r
        assert r[f"ent_err_{name}"] <= LOGP_ATOL, r


def test_layout_guard_refuses_what_the_attention_would_get_wrong(results):
    for r in results:
        assert r["guard_megatron_thd"] is not None and "model.core_attention=sdpa" in r["guard_megatron_thd"]
        assert "\n" not in r["guard_megatron_thd"]
        assert r["guard_megatron_mask"] is None and r["guard_sdpa_both"] == (None, None)


def test_without_packing_information_documents_leak(results):
    # the comparison above can fail: the same rows without cu_seqlens attend across documents
    assert all(r["lp_err_unpacked"] > 1e-3 for r in results)


@pytest.mark.parametrize("name", ["fused_sp", "chunked", "chunked_sp", "mask_fused"])
def test_step_with_sequence_parallel_equals_without(results, name):
    for r in results:
        assert r[f"loss_rel_{name}"] <= LOSS_RTOL, r
        assert r[f"entropy_rel_{name}"] <= LOSS_RTOL, r
        assert r[f"grad_rel_{name}"] <= GRAD_RTOL, r
    assert results[0]["norm_grad_nonzero"]


def test_sft_loss_same_with_thd_and_mask(results):
    for r in results:
        thd, mask = r["sft"]["thd"], r["sft"]["mask"]
        for a, b in zip(thd, mask):
            assert abs(a - b) <= 1e-5 * abs(b), r["sft"]
        assert thd[3] < thd[0]  # the step trained


# -- the 32B example's training settings, scaled down: SP, fused output layer, 17,408-token rows ------

EXAMPLE_OVERRIDES = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.vocab_size=1024",
    "model.precision=fp32",  # CPU
    "model.tokenizer=null",
    "parallel.tensor_model_parallel_size=2",
    "parallel.pipeline_model_parallel_size=1",
    "parallel.overlap_grad_reduce=false",
    "run.device=cpu",
    "rollout.engine=hf",
]
EXAMPLE_DOCS = [(9_000, 200), (5_000, 150), (3_000, 100), (12_000, 300)]  # (tokens, prompt) per response


def one_rl_step(cfg, docs, plens) -> dict:
    """One T1 step as the loop runs it on ``docs`` (token lists with prompt lengths ``plens``):
    packing, policy and anchor log-prob passes, one optimizer step with +-1 advantages. Needs
    ``init_parallel`` done; also used by tests/gpu/test_gpu_long_context.py."""
    import time

    import torch

    from megatron_t1.data.packing import schedule_shape
    from megatron_t1.data.rl_batch import collate_rl_rank, plan_rl_packing
    from megatron_t1.mcore.anchor_store import AnchorStore
    from megatron_t1.mcore.model import build_model, packed_layout
    from megatron_t1.mcore.rl_forward import compute_logprobs, rl_forward_step
    from megatron_t1.mcore.train_step import build_optimizer, train_step

    chunks = build_model(cfg)
    opt, sched = build_optimizer(cfg, chunks)
    anchor = AnchorStore(chunks, cfg.anchor)
    layout, seq, micro = packed_layout(cfg), cfg.data.seq_length, cfg.data.micro_batch_size
    plan = plan_rl_packing([len(d) for d in docs], seq, dp=1, micro_batch_size=micro)
    mbs = collate_rl_rank(plan, 0, docs, plens, pad_id=0, layout=layout)
    s, b = schedule_shape(layout, seq, micro)
    tau, vocab = cfg.rollout.temperature, cfg.model.vocab_size
    kw = dict(temperature=tau, vocab_size=vocab, seq_length=s, micro_batch_size=b,
              fused_output_layer=cfg.loss.fused_output_layer)  # fmt: skip
    on_gpu = torch.cuda.is_available() and cfg.run.device != "cpu"
    if on_gpu:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    pol = compute_logprobs(chunks, mbs, **kw)
    with anchor.swapped_in():
        anc = compute_logprobs(chunks, mbs, **kw)
    G = sum(len(d) - pl for d, pl in zip(docs, plens))
    for i, mb in enumerate(mbs):
        mb["advantages"] = torch.where(mb["doc_ids"] % 2 == 0, 1.0, -1.0) * mb["loss_mask"]
        mb["anchor_logprobs"], mb["rollout_logprobs"] = anc[i]["logprobs"].cpu(), pol[i]["logprobs"].cpu()

    def step_fn(it, m):
        return rl_forward_step(
            it, m, loss_config=cfg.loss, temperature=tau, vocab_size=vocab, global_num_tokens=G,
            global_num_seqs=len(docs),
        )  # fmt: skip

    out = train_step(chunks, opt, sched, step_fn, mbs, seq_length=s, micro_batch_size=b)
    res = {
        "layout": layout,
        "rows": len(mbs),
        "G": G,
        "loss": out.loss,
        "grad_norm": out.grad_norm,
        "skipped": out.skipped,
        "anchor_equal": max(float((a["logprobs"] - p_["logprobs"]).abs().max()) for a, p_ in zip(anc, pol)),
        "seconds": time.perf_counter() - t,
    }
    if on_gpu:
        res |= {"peak_above_gib": (torch.cuda.max_memory_allocated() - base) / 2**30, "resident_gib": base / 2**30}
    return res


def _example_worker(rank, world, tmp):
    from pathlib import Path

    import torch

    from megatron_t1.config import load_config
    from megatron_t1.mcore.parallel import destroy_parallel, init_parallel

    example = Path(__file__).resolve().parents[2] / "examples" / "qwen2.5_32b" / "rl.yaml"
    cfg = load_config(example, EXAMPLE_OVERRIDES + [f"run.output_dir={tmp}"])
    p = cfg.parallel
    settings = (p.sequence_parallel, cfg.loss.fused_output_layer, cfg.data.seq_length, cfg.model.recompute,
                p.use_distributed_optimizer)  # fmt: skip
    init_parallel(p, seed=3, device="cpu")
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 1000, (n,), generator=g).tolist() for n, _ in EXAMPLE_DOCS]
    res = {"settings": settings, **one_rl_step(cfg, docs, [pl for _, pl in EXAMPLE_DOCS])}
    destroy_parallel()
    return res


@pytest.fixture(scope="module")
def example_step(tmp_path_factory):
    return run_ranks(_example_worker, 2, args=(str(tmp_path_factory.mktemp("ex32")),), timeout=600)


def test_the_32b_examples_training_settings_run_a_step_at_tp2(example_step):
    for r in example_step:
        assert r["settings"] == (True, True, 17_408, "full", True)
        assert r["layout"] == "thd" and r["rows"] == 2
        assert r["G"] == sum(n - p for n, p in EXAMPLE_DOCS)
        assert not r["skipped"] and math.isfinite(r["loss"]) and r["grad_norm"] > 0, r
        assert r["anchor_equal"] == 0.0  # the anchor is the starting policy: same log-probs
    assert example_step[0]["loss"] == example_step[1]["loss"]
    print(f"\n32B settings at TP=2, 2 rows of 17,408 tokens: {example_step[0]}")
