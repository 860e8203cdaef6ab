"""Converted checkpoints in real Megatron-Core on 2 gloo ranks: logits equal transformers' at TP=2
and PP=2 for Qwen2 (GQA, QKV bias), Llama (tied embeddings), GLM (partial interleaved rotary) and
Qwen3 (per-head q/k norms, head_dim != hidden / heads); ``load_hf_into_model`` agrees; a checkpoint
that Megatron itself saved at TP=2 exports back to the original HF tensors bit for bit. Qwen3-MoE
(Megatron's MoE layer, alltoall dispatcher): its converted torch_dist checkpoint, loaded with
Megatron's ``dist_checkpointing``, and ``load_hf_into_model`` both match transformers at TP=1,
TP=2, PP=2 and EP=2 (gloo all_to_all); the checkpoint Megatron saves at EP=2 has the converter's
keys, shapes and tensors and exports back to the HF tensors bit for bit. Negative controls: QKV
concatenated instead of grouped (Qwen2), q_norm and k_norm swapped (Qwen3), experts 0 and 1
swapped (in memory, and in a converted checkpoint loaded at EP=2) and, at EP=2, every rank loading
experts 0 and 1 (Qwen3-MoE).

Everything runs in ONE spawn of 2 ranks (process start and ``import megatron.core`` cost ~7 s); the
ranks re-initialise Megatron's groups for each layout.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist.harness import run_ranks
from tests.unit.test_convert_ckpt import (
    ARCHS,
    MOE,
    VOCAB,
    build_hf_model,
    hf_tensors,
    make_hf_dir,
    swap_experts_0_1,
)

pytestmark = pytest.mark.dist

TOL = 1e-4
LAYOUTS = ((2, 1), (1, 2))
MOE_LAYOUTS = ((1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2))  # (TP, PP, EP)
MEGATRON_SAVES = {("qwen2", 2, 1, 1): "qwen2_tp2", (MOE, 2, 1, 1): "moe_tp2", (MOE, 1, 1, 2): "moe_ep2"}
"""(arch, TP, PP, EP) -> folder: layouts at which Megatron saves the loaded model, to export it again."""
TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))


def _negative_controls() -> dict:
    """``(arch, name) -> (module, attribute, wrong value, (TP, PP, EP))``: bugs that the logits at that
    layout must show.
    QKV concatenated instead of grouped (the classic bug); q_norm and k_norm swapped, experts 0 and 1
    swapped (a round trip cannot see these: each swap is its own inverse)."""
    import dataclasses

    import megatron_t1.convert.maps as maps
    import megatron_t1.convert.registry as registry
    import megatron_t1.mcore.convert_io as convert_io

    swap = dict(q_norm="self_attn.k_norm.weight", k_norm="self_attn.q_norm.weight")
    specs = tuple(
        dataclasses.replace(s, names=dataclasses.replace(s.names, **swap)) if s.name == "qwen3" else s
        for s in registry.SPECS
    )
    good_moe_maps = maps._moe_maps

    def swapped_experts(*args):
        return swap_experts_0_1(good_moe_maps(*args))

    return {
        ("qwen2", "wrong_qkv"): (maps, "merge_qkv", lambda q, k, v, **_: torch.cat([q, k, v]), (2, 1, 1)),
        ("qwen3", "swapped_qk_norm"): (registry, "SPECS", specs, (2, 1, 1)),
        ("qwen3_moe", "swapped_experts"): (maps, "_moe_maps", swapped_experts, (2, 1, 1)),
        ("qwen3_moe", "no_expert_offset"): (convert_io, "shift_expert", lambda name, _: name, (1, 1, 2)),
    }


def _ranks(rank: int, world: int, cases: dict, save_root: str, swapped_ckpt: str) -> dict:
    import megatron.core.parallel_state as ps

    from megatron_t1.mcore.checkpoint import load_checkpoint, save_checkpoint
    from megatron_t1.mcore.convert_io import layout_config, load_hf_into_model, megatron_logits, verify_config
    from megatron_t1.mcore.model import build_model
    from megatron_t1.mcore.parallel import destroy_parallel, init_parallel

    out: dict = {}
    controls = _negative_controls()
    try:
        for arch, (hf_dir, ckpt, ref) in cases.items():
            for tp, pp, ep in MOE_LAYOUTS if arch == MOE else [(t, p, 1) for t, p in LAYOUTS]:
                key = (arch, tp, pp) if ep == 1 else (arch, tp, pp, ep)
                mc = verify_config(ckpt, seq_len=TOKENS.shape[1]).model
                cfg = layout_config(mc, tp=tp, pp=pp, ep=ep, seq_len=TOKENS.shape[1])
                init_parallel(cfg.parallel, seed=0, device="cpu")
                reports = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                chunks = build_model(cfg, wrap_ddp=False)
                load_checkpoint(ckpt, cfg, chunks, weights_only=True)  # the checkpoint.init_from path
                from_ckpt = megatron_logits(chunks, TOKENS, cfg)
                saved_as = MEGATRON_SAVES.get((arch, tp, pp, ep))
                if saved_as:
                    save_checkpoint(f"{save_root}/{saved_as}", 1, cfg, chunks)  # saved by Megatron
                if (arch, ep) == (MOE, 2):
                    chunks = build_model(cfg, wrap_ddp=False)
                    load_checkpoint(swapped_ckpt, cfg, chunks, weights_only=True)
                    bad = megatron_logits(chunks, TOKENS, cfg)
                    if reports:
                        out[(arch, "swapped_experts_ckpt")] = (bad - ref).abs().max().item()
                chunks = build_model(cfg, wrap_ddp=False)
                load_hf_into_model(chunks, hf_dir, cfg)
                from_hf = megatron_logits(chunks, TOKENS, cfg)
                for (bad_arch, what), (module, attr, wrong, layout) in controls.items():
                    if arch == bad_arch and layout == (tp, pp, ep):
                        good = getattr(module, attr)
                        setattr(module, attr, wrong)
                        try:
                            load_hf_into_model(chunks, hf_dir, cfg)
                            bad = megatron_logits(chunks, TOKENS, cfg)
                        finally:
                            setattr(module, attr, good)
                        if reports:
                            out[(arch, what)] = (bad - ref).abs().max().item()
                if reports:
                    out[(*key, "ckpt")] = (from_ckpt - ref).abs().max().item()
                    out[(*key, "hf")] = (from_hf - ref).abs().max().item()
                    out[(*key, "top1")] = (from_ckpt.argmax(-1) == ref.argmax(-1)).float().mean().item()
    finally:
        destroy_parallel()
    return out


def test_converted_checkpoints_match_transformers_at_tp2_and_pp2(tmp_path, monkeypatch):
    import megatron_t1.convert.maps as maps
    from megatron_t1.convert.offline import hf_to_mcore, mcore_to_hf
    from megatron_t1.convert.torch_dist import TorchDistReader, resolve_checkpoint_dir

    cases = {}
    for i, arch in enumerate((*ARCHS, MOE)):
        hf_dir = make_hf_dir(arch, tmp_path / arch)
        # stored padded for TP=1 (384 rows) or TP=2 (512): loading at the other TP reshards the vocab
        ckpt = hf_to_mcore(hf_dir, tmp_path / f"{arch}_mcore", tp=1 + i % 2, progress=False)
        with torch.no_grad():
            ref = build_hf_model(arch)(TOKENS).logits.float()
        assert ref.std() > 0.3  # O(1) logits: 1e-4 is a real test
        cases[arch] = (str(hf_dir), str(ckpt), ref)
    good = maps._moe_maps
    monkeypatch.setattr(maps, "_moe_maps", lambda *a: swap_experts_0_1(good(*a)))
    swapped = hf_to_mcore(tmp_path / MOE, tmp_path / "swapped_mcore", progress=False)
    monkeypatch.undo()

    # the reporting rank differs per layout (TP=2: rank 0; PP=2: rank 1, the last stage)
    saved = tmp_path / "saved"
    result = {
        k: v
        for r in run_ranks(_ranks, 2, args=(cases, str(saved), str(swapped)), timeout=300)
        for k, v in r.items()
    }
    for arch in ARCHS:
        for tp, pp in LAYOUTS:
            assert result[(arch, tp, pp, "ckpt")] <= TOL, (arch, tp, pp, result)
            assert result[(arch, tp, pp, "hf")] <= TOL, (arch, tp, pp, result)
            assert result[(arch, tp, pp, "top1")] == 1.0
    for tp, pp, ep in MOE_LAYOUTS:
        key = (MOE, tp, pp) if ep == 1 else (MOE, tp, pp, ep)
        assert result[(*key, "ckpt")] <= TOL, (key, result)
        assert result[(*key, "hf")] <= TOL, (key, result)
        assert result[(*key, "top1")] == 1.0
    assert len(result) == 3 * len(ARCHS) * len(LAYOUTS) + 3 * len(MOE_LAYOUTS) + 5
    assert result[("qwen2", "wrong_qkv")] > 1e-2
    assert result[("qwen3", "swapped_qk_norm")] > 1e-2
    assert result[(MOE, "swapped_experts")] > 1e-2
    assert result[(MOE, "swapped_experts_ckpt")] > 1e-2
    assert result[(MOE, "no_expert_offset")] > 1e-2

    # Checkpoints written by Megatron's dist_checkpointing (at TP=2: gate/up and row-parallel chunks
    # per rank, vocabulary padded to 512; Qwen3-MoE at EP=2: each rank its experts, gate and up
    # apart) export to exactly the original HF tensors.
    for (arch, *_), name in MEGATRON_SAVES.items():
        out = mcore_to_hf(
            saved / name, tmp_path / f"{name}_export", hf_template=tmp_path / arch, progress=False
        )
        a, b = hf_tensors(tmp_path / arch), hf_tensors(out)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # ... and Megatron's MoE checkpoint at EP=2 has the converter's keys, global shapes and tensors
    # (the converter's also has TE-spec keys that the local spec does not save).
    megatron = TorchDistReader(resolve_checkpoint_dir(saved / "moe_ep2"))
    ours = TorchDistReader(cases[MOE][1])
    assert set(megatron.keys()) <= set(ours.keys()), set(megatron.keys()) - set(ours.keys())
    tensors = [k for k in megatron.keys() if "_extra_state" not in k]
    assert any(".experts.experts.linear_fc1.weight" in k for k in tensors)
    for k in tensors:
        m, o = megatron.tensor_meta(k), ours.tensor_meta(k)
        assert (m.size, m.properties.dtype) == (o.size, o.properties.dtype), k
        assert torch.equal(megatron.read(k), ours.read(k)), k


@pytest.mark.parametrize("arch", ["glm", "qwen3"])
def test_verify_command_spawns_ranks_and_reports(arch, tmp_path, capsys):
    """``convert_ckpt.py verify`` end to end: it spawns its own rank (one here, TP=1, to keep the
    suite short; TP=2 and PP=2 logits are covered above with the same functions)."""
    import importlib.util
    from pathlib import Path

    from megatron_t1.convert.offline import hf_to_mcore

    hf_dir = make_hf_dir(arch, tmp_path / arch)
    ckpt = hf_to_mcore(hf_dir, tmp_path / "mcore", tp=2, progress=False)  # padded for TP=2, loaded at 1
    spec = importlib.util.spec_from_file_location(
        "convert_ckpt", Path(__file__).parents[2] / "tools/convert_ckpt.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    code = cli.main(["verify", "--hf-dir", str(hf_dir), "--mcore-dir", str(ckpt), "--tol", "1e-4"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "top-1 agreement 1.0000" in text and "OK" in text


def test_verify_command_at_ep2(tmp_path, capsys):
    """``verify --ep 2``: two spawned ranks, each holding half the experts, all-to-all dispatch."""
    import importlib.util
    from pathlib import Path

    from megatron_t1.convert.offline import hf_to_mcore

    hf_dir = make_hf_dir(MOE, tmp_path / "moe")
    ckpt = hf_to_mcore(hf_dir, tmp_path / "mcore", progress=False)
    spec = importlib.util.spec_from_file_location(
        "convert_ckpt", Path(__file__).parents[2] / "tools/convert_ckpt.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    code = cli.main(
        ["verify", "--hf-dir", str(hf_dir), "--mcore-dir", str(ckpt), "--ep", "2", "--tol", "1e-4"]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "top-1 agreement 1.0000" in text and "(experts: SequentialMLP): OK" in text  # no TE here
