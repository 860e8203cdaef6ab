"""GPU checks of the Qwen3-MoE policy (skipped without CUDA; run on a lent GPU machine).

The converted checkpoint verifies against transformers with Megatron on the GPU (TE's grouped GEMM
experts when TE has grouped linears, else the local spec's SequentialMLP). With TE: the grouped
experts (``TEGroupedMLP``) give SequentialMLP's logits for the same HF weights, export back to those
HF tensors bit for bit (weight sync, conversion), and a model trained with them saves a distributed
checkpoint that the SequentialMLP model loads to the same logits.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.unit.test_convert_ckpt import MOE, VOCAB, hf_tensors, make_hf_dir

pytestmark = pytest.mark.gpu

needs_te = pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is None, reason="TransformerEngine not installed"
)


def test_qwen3_moe_checkpoint_verifies_on_gpu(tmp_path):
    from megatron_t1.convert.offline import hf_to_mcore
    from megatron_t1.mcore.convert_io import verify
    from megatron_t1.mcore.model import te_grouped_linear_available

    src = make_hf_dir(MOE, tmp_path / "hf")
    ckpt = hf_to_mcore(src, tmp_path / "mcore", progress=False)
    r = verify(src, ckpt, device="auto", seq_len=24)
    assert r["experts"] == ("TEGroupedMLP" if te_grouped_linear_available() else "SequentialMLP")
    assert r["top1_agreement"] == 1.0
    assert r["max_abs_diff"] < 2e-3, r  # fp32 on the GPU (cuBLAS / TE GEMMs) vs transformers on CPU


def _cfg(grouped: bool, tmp):
    from megatron_t1.convert.registry import model_config_from_hf_dir
    from megatron_t1.mcore.convert_io import layout_config

    _, mc, _ = model_config_from_hf_dir(tmp / "hf")
    mc.moe_grouped_gemm = grouped
    cfg = layout_config(mc, device="cuda", seq_len=24)
    cfg.run.output_dir = str(tmp / "run")
    return cfg


@needs_te
def test_grouped_gemm_experts_match_sequential_export_and_share_checkpoints(tmp_path):
    from megatron_t1.mcore.checkpoint import load_checkpoint, save_checkpoint
    from megatron_t1.mcore.convert_io import load_hf_into_model, megatron_logits
    from megatron_t1.mcore.export import iter_hf_buckets
    from megatron_t1.mcore.model import build_model, unwrap
    from megatron_t1.mcore.parallel import destroy_parallel, init_parallel

    src = make_hf_dir(MOE, tmp_path / "hf")
    want = hf_tensors(src)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    logits, kinds = {}, {}
    for grouped in (True, False):
        cfg = _cfg(grouped, tmp_path)
        init_parallel(cfg.parallel, seed=0, device="cuda")
        try:
            chunks = build_model(cfg, wrap_ddp=False)
            kinds[grouped] = type(unwrap(chunks[0]).decoder.layers[0].mlp.experts).__name__
            load_hf_into_model(chunks, src, cfg)
            logits[grouped] = megatron_logits(chunks, tokens, cfg).cpu()
            if grouped:
                got = {n: t.cpu().clone() for b in iter_hf_buckets(chunks, cfg) for n, t in b}
                assert set(got) == set(want)
                bad = [n for n in want if not torch.equal(got[n], want[n])]
                assert not bad, bad[:5]
                with torch.no_grad():  # a checkpoint of weights the HF folder does not have
                    for n, p in chunks[0].named_parameters():
                        if ".experts." in n:
                            p.mul_(1.5)
                changed = megatron_logits(chunks, tokens, cfg).cpu()
                saved = save_checkpoint(tmp_path / "ckpt", 1, cfg, chunks)
            else:
                load_checkpoint(saved, cfg, chunks, weights_only=True)
                reloaded = megatron_logits(chunks, tokens, cfg).cpu()
        finally:
            destroy_parallel()
    assert kinds == {True: "TEGroupedMLP", False: "SequentialMLP"}
    assert (logits[True] - logits[False]).abs().max().item() < 2e-3
    assert (changed - logits[True]).abs().max().item() > 1e-2  # the scaled experts matter
    assert (reloaded - changed).abs().max().item() < 2e-3
