"""Weight sync on 2 real gloo ranks: a TP=2 (then PP=2) Megatron policy streams its weights into the
HF rollout engine held by rank 0; afterwards the engine's log-probs equal the policy's.

One spawn for every check (process start + ``import megatron.core`` cost ~7 s):

* TP=2, tied embeddings: the bucketed export (strided TP merge, several small buckets) equals a
  naive reference (per-tensor ``all_gather`` + :func:`merge_tp` + the converter's
  ``iter_hf_tensors_from_megatron``) bit for bit; parity is broken before the sync and restored
  after it; samples generated at temperature 1.2 carry the policy's tempered log-probs; a sync into
  an engine that skips tensors (after the policy changed) raises ParityError on *both* ranks.
* PP=2, untied head: the export crosses the pipeline (broadcast from the owning stage) and the
  engine again matches the policy.
"""

from __future__ import annotations

import pytest

from tests.dist.harness import run_ranks

pytestmark = pytest.mark.dist

VOCAB = 500  # padded to 512 for TP=2: the padding must be stripped on export
TEMP = 1.2


def _cfg(tp: int, pp: int, tied: bool):
    from megatron_t1.config import config_from_dict

    return config_from_dict(
        {
            "model": {
                "num_layers": 2,
                "hidden_size": 64,
                "ffn_hidden_size": 96,
                "num_attention_heads": 4,
                "num_query_groups": 2,
                "vocab_size": VOCAB,
                "max_position_embeddings": 128,
                "tie_word_embeddings": tied,
                # Peaked distributions: two random models then differ clearly in log-probs.
                "init_method_std": 0.3,
            },
            "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
            "data": {"seq_length": 32, "micro_batch_size": 1, "global_batch_size": 2 // (tp * pp) or 1},
            "run": {"device": "cpu"},
        }
    )


def _hf_engine(cfg, tokenizer):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_t1.convert.qwen2 import hf_config
    from megatron_t1.rollout.hf_engine import HFEngine

    torch.manual_seed(99)  # weights unrelated to the policy's
    hf = hf_config(cfg.model, "float32")
    hf["initializer_range"] = 0.3
    return HFEngine(Qwen2ForCausalLM(Qwen2Config(**hf)), tokenizer)


def _naive_export(chunks, cfg):
    """Reference: per-parameter all_gather over TP, merge_tp, then the converter's stream (TP only)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_t1.convert.maps import iter_hf_tensors_from_megatron
    from megatron_t1.convert.sharding import merge_tp, tp_rule
    from megatron_t1.mcore.model import unwrap

    grp = ps.get_tensor_model_parallel_group()
    full = []
    for name, p in unwrap(chunks[0]).named_parameters():
        rule = tp_rule(name)
        if rule != "replicated":
            parts = [torch.empty_like(p) for _ in range(dist.get_world_size(grp))]
            dist.all_gather(parts, p.detach().contiguous(), group=grp)
            t = merge_tp(parts, rule, name=name)
        else:
            t = p.detach()
        full.append((name, t))
    return dict(iter_hf_tensors_from_megatron(full, cfg))


def _worker(rank, world):
    import torch
    import torch.distributed as dist

    from megatron_t1.data.synthetic import make_sft_examples
    from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer
    from megatron_t1.mcore.convert_io import megatron_logits
    from megatron_t1.mcore.export import iter_hf_tensors
    from megatron_t1.mcore.model import build_model
    from megatron_t1.mcore.parallel import init_parallel
    from megatron_t1.rollout.engine import SamplingParams
    from megatron_t1.rollout.weight_sync import ParityError, WeightSync, parity_probe

    res: dict = {}
    tokenizer = train_tokenizer(chat_corpus(make_sft_examples(100, 0)), VOCAB)

    # -- TP=2, tied ------------------------------------------------------------------------------
    cfg = _cfg(2, 1, tied=True)
    init_parallel(cfg.parallel, seed=1234, device="cpu")
    chunks = build_model(cfg, wrap_ddp=False)
    engine = _hf_engine(cfg, tokenizer) if rank == 0 else None
    sync = WeightSync(cfg, bucket_mb=0.02, threshold=1e-3)  # ~20 KB buckets: many of them

    ref = _naive_export(chunks, cfg)
    # Clones: the stream's tensors are views into reused (double-buffered) bucket buffers.
    got = [(n, t.clone()) for n, t in iter_hf_tensors(chunks, cfg, bucket_mb=0.02)]
    res["export_names"] = [n for n, _ in got]
    res["export_ref_names"] = sorted(ref)
    res["export_max_diff"] = max((t - ref[n]).abs().max().item() for n, t in got)
    res["embed_rows"] = dict(got)["model.embed_tokens.weight"].shape[0]

    res["parity_before"] = parity_probe(engine, chunks, cfg, sync.probe)[0]
    result = sync(engine, chunks)
    res["parity_after"] = result.parity_mean_abs
    res["loaded"] = result.tensors
    res["synced_bytes"] = result.bytes

    # Samples at temperature 1.2 carry the policy's tempered log-probs.
    samples = None
    if rank == 0:
        out = engine.generate(
            ["Compute 12 + 7.", [5, 6, 7, 8, 9]], 2, SamplingParams(TEMP, max_tokens=12, seed=3)
        )
        samples = [(r.prompt_token_ids, c.token_ids, c.logprobs) for r in out for c in r.completions]
    box = [samples]
    dist.broadcast_object_list(box, src=0)
    diffs = []
    for prompt, toks, lps in box[0]:
        seq = torch.tensor([prompt + toks])
        logits = megatron_logits(chunks, seq, cfg)
        logp = torch.log_softmax(logits[0, :-1] / TEMP, dim=-1).gather(-1, seq[0, 1:, None])[:, 0]
        diffs.append((logp[len(prompt) - 1 :] - torch.tensor(lps)).abs().max().item())
    res["sample_logprob_diff"] = max(diffs)

    # The policy changes (as after an optimizer step); an engine that drops layer 1's attention
    # tensors misses the change: the probe must stop the run on every rank.
    # The same noise on every rank: replicated tensors (norms) must stay identical across TP.
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))

    class Dropping:
        def __init__(self, inner):
            self.inner = inner

        def update_weights(self, named):
            return self.inner.update_weights((n, t) for n, t in named if "layers.1.self_attn" not in n)

        def score(self, seqs):
            return self.inner.score(seqs)

    try:
        sync(Dropping(engine) if engine is not None else None, chunks)
        res["broken_sync"] = "no error"
    except ParityError as e:
        res["broken_sync"] = str(e)
    res["parity_resync"] = sync(engine, chunks).parity_mean_abs
    # An engine on each rank, rank 1's dropping every update: the error names engine 1 alone, on both
    # ranks, and the per-engine table has both.
    mine = engine if rank == 0 else Dropping(_hf_engine(cfg, tokenizer))
    units = [(f"engine {rank} (rank {rank})", mine)]
    try:
        sync(mine, chunks, units=units)
        res["named"] = "no error"
    except ParityError as e:
        res["named"] = str(e)
    res["per_engine"] = sorted(sync(mine, chunks, units=units, check=False).per_engine)

    # -- PP=2, untied head -------------------------------------------------------------------------
    cfg = _cfg(1, 2, tied=False)
    init_parallel(cfg.parallel, seed=4321, device="cpu")
    chunks = build_model(cfg, wrap_ddp=False)
    engine = _hf_engine(cfg, tokenizer) if rank == 0 else None
    sync = WeightSync(cfg, threshold=1e-3)
    res["pp_parity_before"] = parity_probe(engine, chunks, cfg, sync.probe)[0]
    result = sync(engine, chunks)
    res["pp_parity_after"] = result.parity_mean_abs
    res["pp_loaded"] = result.tensors
    return res


def test_weight_sync_tp2_pp2_into_hf_engine():
    r0, r1 = run_ranks(_worker, 2, timeout=180)
    # Export: the full HF model, in the converter's names, equal to the naive reference.
    assert sorted(r0["export_names"]) == r0["export_ref_names"]
    assert len(set(r0["export_names"])) == len(r0["export_names"])
    assert r0["export_max_diff"] == 0.0 and r1["export_max_diff"] == 0.0
    assert r0["embed_rows"] == VOCAB  # TP padding (512 rows) stripped
    # Parity: broken by unrelated random weights, restored by the sync, agreed by both ranks.
    for r in (r0, r1):
        assert r["parity_before"] > 0.1
        assert r["parity_after"] < 1e-5
        assert r["pp_parity_before"] > 0.1
        assert r["pp_parity_after"] < 1e-5
        assert r["parity_resync"] < 1e-5
        assert "broke parity" in r["broken_sync"] and "parity_threshold" in r["broken_sync"]
        assert "parity on 1 of 2 rollout engine(s) (engine 1 (rank 1): mean" in r["named"], r["named"]
        assert "engine 0" not in r["named"]
        assert r["per_engine"] == ["engine 0 (rank 0)", "engine 1 (rank 1)"]
    # Tied: embed + 2 x (2 norms, q/k/v weight + bias, o, gate, up, down = 12) + norm + tied lm_head.
    assert r0["loaded"] == 1 + 2 * 12 + 1 + 1 and r1["loaded"] == 0
    assert r0["pp_loaded"] == 1 + 2 * 12 + 1 + 1  # untied: lm_head is a tensor of its own
    assert r0["synced_bytes"] == r1["synced_bytes"] > 0
    assert r0["sample_logprob_diff"] < 1e-4
