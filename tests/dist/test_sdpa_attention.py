"""The SDPA core attention (model.core_attention=sdpa, the default) gives Megatron's own unfused
attention's logits and gradients, on 2 gloo ranks at TP=2 with GQA, for a causal row and for packed
rows with a block-diagonal mask."""

from __future__ import annotations

import pytest

from tests.dist.harness import run_ranks

pytestmark = pytest.mark.dist

VOCAB, SEQ = 200, 48


def _cfg(core: str, tmp: str):
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
                "max_position_embeddings": 64,
                "core_attention": core,
            },
            "parallel": {"tensor_model_parallel_size": 2},
            "data": {"seq_length": SEQ, "micro_batch_size": 2, "global_batch_size": 2},
            "run": {"train_steps": 1, "device": "cpu", "output_dir": tmp},
        }
    )


def _worker(rank, world, tmp):
    import torch

    from megatron_t1.data.packing import block_diagonal_causal_mask
    from megatron_t1.mcore.model import build_model, unwrap
    from megatron_t1.mcore.parallel import destroy_parallel, init_parallel

    ref_cfg = _cfg("megatron", tmp)
    init_parallel(ref_cfg.parallel, seed=3, device="cpu")
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    segments = torch.tensor([[0] * 20 + [1] * 28, [0] * 5 + [1] * 30 + [2] * 13])
    masks = {"causal": None, "packed": block_diagonal_causal_mask(segments)}
    pos = torch.arange(SEQ).expand(2, SEQ)

    def run(model, mask):
        model.zero_grad()
        logits = model(tokens, pos, mask)
        (logits.float() ** 2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return logits.detach(), grads

    ref = unwrap(build_model(ref_cfg, wrap_ddp=False)[0])
    new = unwrap(build_model(_cfg("sdpa", tmp), wrap_ddp=False)[0])
    assert type(ref.decoder.layers[0].self_attention.core_attention).__name__ == "DotProductAttention"
    assert type(new.decoder.layers[0].self_attention.core_attention).__name__ == "SDPAttention"
    new.load_state_dict(ref.state_dict())
    out = {}
    for name, mask in masks.items():
        lr, gr = run(ref, mask)
        ls, gs = run(new, mask)
        out[name] = {
            "logit_err": float((lr - ls).abs().max()),
            "logit_scale": float(lr.abs().max()),
            "grad_err": max(
                float((gr[n] - gs[n]).abs().max() / gr[n].abs().max().clamp(min=1e-12)) for n in gr
            ),
        }
    # the packed mask really changes the answer (otherwise the comparison above proves little)
    out["mask_effect"] = float((run(new, masks["causal"])[0] - run(new, masks["packed"])[0]).abs().max())
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_worker, 2, args=(str(tmp_path_factory.mktemp("sdpa")),), timeout=240)


@pytest.mark.parametrize("mask", ["causal", "packed"])
def test_sdpa_matches_megatron_attention(results, mask):
    for r in results:
        assert r[mask]["logit_err"] <= 1e-5 * max(1.0, r[mask]["logit_scale"]), r[mask]
        assert r[mask]["grad_err"] <= 1e-4, r[mask]


def test_packed_mask_matters(results):
    assert all(r["mask_effect"] > 1e-2 for r in results)
