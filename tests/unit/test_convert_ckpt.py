"""Offline conversion with real transformers models: HF -> torch_dist -> HF bit for bit (dense and
Qwen3-MoE), the export loads and generates in transformers, bad inputs fail with names, interrupted
runs leave nothing.

The tiny models (built here, also used by tests/dist/test_convert_dist.py) have every weight
re-drawn at a scale that makes logits O(1) and biases / norm weights non-trivial, so that a wrong
layout cannot hide behind zero biases or unit norms.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from megatron_t1.convert.hf_io import INDEX_FILE, SafetensorsReader
from megatron_t1.convert.maps import ConvertError
from megatron_t1.convert.offline import hf_to_mcore, mcore_to_hf
from megatron_t1.convert.torch_dist import FORMAT, METADATA_FILE, MODEL_PREFIX, TorchDistReader

VOCAB = 300  # padded to 384 at TP=1 and 512 at TP=2: vocabulary padding is always exercised
ARCHS = ("qwen2", "llama", "glm", "qwen3")
"""Dense architectures (tests/dist/test_convert_dist.py loads them at TP=2 and PP=2)."""
MOE = "qwen3_moe"
CONVERTED = (*ARCHS, MOE)
TIED = ("llama", "qwen3")


def build_hf_model(arch: str, seed: int = 0):
    """A tiny transformers model of ``arch`` with randomised weights (float32, eval mode).

    qwen2: GQA (4 query / 2 key-value heads), QKV bias, untied head; llama: GQA, no bias, tied
    embeddings; glm: GlmForCausalLM, partial interleaved rotary, fused gate_up, QKV bias, untied;
    qwen3: Qwen3ForCausalLM, per-head q/k RMSNorm, head_dim 32 != hidden / heads = 16, no bias, tied;
    qwen3_moe: Qwen3MoeForCausalLM, qwen3's attention, 4 experts of 32, top 2 renormalised, untied
    (``MOE``: not in ARCHS, as the dist tests load it at layouts of its own, with EP).
    """
    from transformers import (
        GlmConfig,
        GlmForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    common = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False, rope_theta=1e6))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=32, tie_word_embeddings=True, rope_theta=1e6))
    elif arch == "qwen3_moe":
        moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
        model = Qwen3MoeForCausalLM(
            Qwen3MoeConfig(**common, **moe, head_dim=32, tie_word_embeddings=False, rope_theta=1e6)
        )
    else:
        model = GlmForCausalLM(GlmConfig(**common, head_dim=16, tie_word_embeddings=False))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model.eval()


def save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="t1", pad_token="t0"
    ).save_pretrained(path)


def make_hf_dir(arch: str, path: Path, **save_kw) -> Path:
    build_hf_model(arch).save_pretrained(path, **save_kw)
    save_tokenizer(path)
    return path


def hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsReader(path) as r:
        return {n: r.get(n) for n in r.names()}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {a: make_hf_dir(a, root / a) for a in CONVERTED}


@pytest.mark.parametrize("arch", CONVERTED)
def test_round_trip_is_bitwise_and_exports_a_complete_hf_folder(arch, hf_dirs, tmp_path):
    src = hf_dirs[arch]
    ckpt = hf_to_mcore(src, tmp_path / "mcore", tp=2, pp=2, ep=2 if arch == MOE else None, progress=False)
    meta = json.loads((ckpt / METADATA_FILE).read_text())
    assert meta["format"] == FORMAT and meta["tp"] == 2 and meta["pp"] == 2 and meta["step"] == 0
    assert meta["model"]["arch"] == arch and meta["model"]["vocab_size"] == VOCAB
    assert {"common.pt", "metadata.json", ".metadata"} <= {p.name for p in ckpt.iterdir()}

    out = mcore_to_hf(ckpt, tmp_path / "hf_out", progress=False, max_shard_bytes=200_000)
    a, b = hf_tensors(src), hf_tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] == (arch in TIED) and ("lm_head.weight" in a) == (arch not in TIED)
    if arch == "qwen3":
        assert cfg["head_dim"] == 32 and "model.layers.1.self_attn.k_norm.weight" in a
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).is_file(), f


@pytest.mark.parametrize("arch", CONVERTED)
def test_export_loads_in_transformers_and_generates_the_same_tokens(arch, hf_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = hf_dirs[arch]
    out = mcore_to_hf(hf_to_mcore(src, tmp_path / "m", tp=2, progress=False), tmp_path / "hf", progress=False)
    ref, got = build_hf_model(arch), AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(got) is type(ref)
    ids = torch.tensor([[3, 17, 42, 99, 5, 7]])
    with torch.no_grad():
        ref_logits = ref(ids).logits
        assert ref_logits.std() > 0.3  # logits O(1): a layout error could not hide below 1e-4
        assert torch.equal(got(ids).logits, ref_logits)
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(got.generate(ids, **kw), ref.generate(ids, **kw))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    assert type(AutoTokenizer.from_pretrained(out)) is type(AutoTokenizer.from_pretrained(src))


def test_dtype_conversion_paths(hf_dirs, tmp_path):
    src = hf_dirs["qwen2"]
    ckpt = hf_to_mcore(src, tmp_path / "bf16", dtype="bf16", progress=False)
    r = TorchDistReader(ckpt)
    assert {r.tensor_meta(k).properties.dtype for k in r.keys() if "extra_state" not in k} == {torch.bfloat16}
    out = mcore_to_hf(ckpt, tmp_path / "hf_fp32", dtype="fp32", progress=False)
    a, b = hf_tensors(src), hf_tensors(out)
    for k in a:
        assert b[k].dtype == torch.float32 and torch.equal(b[k], a[k].to(torch.bfloat16).float()), k
    assert json.loads((out / "config.json").read_text()).get("dtype", "float32") == "float32"


@pytest.mark.parametrize("arch", ["glm", MOE])
def test_checkpoint_is_standard_dcp(arch, hf_dirs, tmp_path):
    """torch's own DCP reader loads what the streaming writer wrote (and our reader agrees, for a
    whole key, a layer, and an expert of a layer)."""
    import torch.distributed.checkpoint as dcp

    ckpt = hf_to_mcore(hf_dirs[arch], tmp_path / "m", tp=2, progress=False)
    r = TorchDistReader(ckpt)
    keys = [k for k in r.keys() if "extra_state" not in k]
    assert f"{MODEL_PREFIX}decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys
    state = {k: torch.empty(r.tensor_meta(k).size, dtype=r.tensor_meta(k).properties.dtype) for k in keys}
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    for k in keys:
        assert torch.equal(state[k], r.read(k)), k
        if "decoder.layers" in k:
            assert torch.equal(state[k][1], r.read(k, (1,)))
        if ".experts.experts." in k:
            assert torch.equal(state[k][1, 2], r.read(k, (1, 2)))
    emb = state[f"{MODEL_PREFIX}embedding.word_embeddings.weight"]
    assert emb.shape[0] == 512 and not emb[VOCAB:].any()


def test_template_and_stored_assets(hf_dirs, tmp_path):
    src = hf_dirs["llama"]
    ckpt = hf_to_mcore(src, tmp_path / "m", progress=False)
    assert (ckpt / "hf" / "tokenizer.json").is_file()
    # without stored assets, --hf-template supplies config and tokenizer
    for f in (ckpt / "hf").iterdir():
        f.unlink()
    (ckpt / "hf").rmdir()
    out = mcore_to_hf(ckpt, tmp_path / "t", hf_template=src, progress=False)
    assert (out / "tokenizer.json").is_file()
    with pytest.raises(ConvertError, match="is for \\['Qwen2ForCausalLM'\\]"):
        mcore_to_hf(ckpt, tmp_path / "bad", hf_template=hf_dirs["qwen2"], progress=False)
    assert not (tmp_path / "bad").exists()


def test_bad_inputs_fail_with_names(hf_dirs, tmp_path):
    from safetensors.torch import save_file

    src = hf_dirs["qwen2"]
    with pytest.raises(ConvertError, match="not divisible by tensor parallel size 3"):
        hf_to_mcore(src, tmp_path / "a", tp=3, progress=False)
    with pytest.raises(ConvertError, match="output folder .*already exists"):
        hf_to_mcore(src, tmp_path, progress=False)

    unknown = make_hf_dir("qwen2", tmp_path / "unknown")
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps(cfg | {"architectures": ["Glm4ForCausalLM"]}))
    with pytest.raises(ConvertError, match="unsupported architecture \\['Glm4ForCausalLM'\\]"):
        hf_to_mcore(unknown, tmp_path / "b", progress=False)

    sharded = make_hf_dir("qwen2", tmp_path / "sharded", max_shard_size="100KB")
    weight_map = json.loads((sharded / INDEX_FILE).read_text())["weight_map"]
    victim = sorted(set(weight_map.values()))[1]
    os.remove(sharded / victim)
    with pytest.raises(ConvertError, match=f"missing shard .*{victim}"):
        hf_to_mcore(sharded, tmp_path / "c", progress=False)

    wrong = make_hf_dir("qwen2", tmp_path / "wrong")
    tensors = hf_tensors(wrong)
    tensors["model.layers.1.self_attn.v_proj.weight"] = tensors["model.layers.1.self_attn.v_proj.weight"][:-1]
    for f in wrong.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, wrong / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ConvertError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight.*\(31, 64\).*\(32, 64\)"
    ):
        hf_to_mcore(wrong, tmp_path / "d", progress=False)
    assert not any(p.name.startswith((".a", ".b", ".c", ".d")) for p in tmp_path.iterdir())


def test_interrupted_runs_leave_no_folder(hf_dirs, tmp_path, monkeypatch):
    from megatron_t1.convert import hf_io, torch_dist

    calls = {"n": 0}

    def boom(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(torch_dist, "copy_range", boom)
    with pytest.raises(KeyboardInterrupt):
        hf_to_mcore(hf_dirs["qwen2"], tmp_path / "m", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the output nor the temporary folder
    monkeypatch.undo()

    ckpt = hf_to_mcore(hf_dirs["qwen2"], tmp_path / "m", progress=False)
    calls["n"] = 0
    monkeypatch.setattr(hf_io, "copy_range", boom)
    with pytest.raises(KeyboardInterrupt):
        mcore_to_hf(ckpt, tmp_path / "hf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_cli_help_and_errors(hf_dirs, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_ckpt", Path(__file__).parents[2] / "tools/convert_ckpt.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    for cmd in ("hf-to-mcore", "mcore-to-hf", "verify"):
        with pytest.raises(SystemExit) as e:
            cli.main([cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "example:" in text and f"convert_ckpt.py {cmd}" in text
    assert (
        cli.main(["hf-to-mcore", "--hf-dir", str(hf_dirs["glm"]), "--out", str(tmp_path / "x"), "--tp", "4"])
        == 2
    )
    assert (
        "num_query_groups (key/value heads)=2 is not divisible by tensor parallel size 4"
        in capsys.readouterr().err
    )
    args = ["hf-to-mcore", "--hf-dir", str(hf_dirs["glm"]), "--out", str(tmp_path / "ok"), "--no-progress"]
    assert cli.main(args) == 0 and (tmp_path / "ok" / METADATA_FILE).is_file()


def test_metadata_constants_match_the_checkpoint_module():
    from megatron_t1.mcore import checkpoint

    assert (checkpoint.FORMAT, checkpoint.METADATA_FILE, checkpoint.MODEL_PREFIX) == (
        FORMAT,
        METADATA_FILE,
        MODEL_PREFIX,
    )


def swap_experts_0_1(maps: list) -> list:
    """The maps with the HF sources of experts 0 and 1 exchanged (a negative control: a round trip
    through the same maps cannot see it, each swap being its own inverse)."""
    import dataclasses

    swap = {".experts.0.": ".experts.1.", ".experts.1.": ".experts.0."}

    def rename(h: str) -> str:
        return next((h.replace(a, b) for a, b in swap.items() if a in h), h)

    return [dataclasses.replace(tm, hf=tuple(map(rename, tm.hf))) for tm in maps]


def test_moe_checkpoint_layout_and_a_swapped_expert_control(hf_dirs, tmp_path, monkeypatch):
    """Qwen3-MoE in Megatron's keys (what ``SequentialMLP.sharded_state_dict`` saves; the Megatron
    side is checked in tests/dist/test_convert_dist.py): experts stacked by global index
    ``[L, E, 2F, H]`` / ``[L, E, H, F]``, one chunk per (layer, expert); the router ``[L, E, H]``;
    the pre-MLP norm also under TE's unfused key (and found there alone). Experts written swapped
    are caught bit for bit."""
    import megatron_t1.convert.maps as maps
    from megatron_t1.convert import offline, torch_dist

    src = hf_dirs[MOE]
    with pytest.raises(ConvertError, match="num_experts=4 is not divisible by expert parallel size 3"):
        hf_to_mcore(src, tmp_path / "ep3", ep=3, progress=False)
    ckpt = hf_to_mcore(src, tmp_path / "m", ep=4, progress=False)
    assert json.loads((ckpt / METADATA_FILE).read_text())["ep"] == 4
    r = TorchDistReader(ckpt)
    p = f"{MODEL_PREFIX}decoder.layers."
    fc1 = r.tensor_meta(p + "mlp.experts.experts.linear_fc1.weight")
    fc2 = r.tensor_meta(p + "mlp.experts.experts.linear_fc2.weight")
    assert tuple(fc1.size) == (2, 4, 64, 64) and tuple(fc2.size) == (2, 4, 64, 32)
    assert sorted(tuple(c.offsets) for c in fc1.chunks) == [(i, e, 0, 0) for i in range(2) for e in range(4)]
    assert tuple(r.tensor_meta(p + "mlp.router.weight").size) == (2, 4, 64)
    assert not any(k.startswith(p + "mlp.linear_fc1.weight") for k in r.keys())
    assert f"{p}mlp.experts.experts.linear_fc2._extra_state/shard_1.3_2.4" in r.keys()
    hf = hf_tensors(src)
    gate, up = (hf[f"model.layers.1.mlp.experts.3.{n}_proj.weight"] for n in ("gate", "up"))
    assert torch.equal(r.read(p + "mlp.experts.experts.linear_fc1.weight", (1, 3)), torch.cat([gate, up]))
    norm = hf["model.layers.1.post_attention_layernorm.weight"]
    for key in ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"):
        assert torch.equal(r.read(p + key, (1,)), norm), key

    # TE's MoE layer spec saves the pre-MLP norm only unfused: such a checkpoint exports the same
    monkeypatch.setitem(torch_dist._TE_NORM_KEYS, "pre_mlp_layernorm.weight", "pre_mlp_layernorm.weight")
    monkeypatch.setattr(offline, "UNFUSED_NORM_KEYS", {})
    te = hf_to_mcore(src, tmp_path / "te", progress=False)
    monkeypatch.undo()
    assert not any(k.startswith(p + "mlp.linear_fc1.layer_norm_weight") for k in TorchDistReader(te).keys())
    out = hf_tensors(mcore_to_hf(te, tmp_path / "te_hf", progress=False))
    assert all(torch.equal(hf[k], out[k]) for k in hf)

    good = maps._moe_maps
    monkeypatch.setattr(maps, "_moe_maps", lambda *a: swap_experts_0_1(good(*a)))
    bad = hf_to_mcore(src, tmp_path / "bad", progress=False)
    monkeypatch.undo()
    out = hf_tensors(mcore_to_hf(bad, tmp_path / "bad_hf", progress=False))
    differ = {k for k in hf if not torch.equal(hf[k], out[k])}
    assert differ == {
        f"model.layers.{i}.mlp.experts.{e}.{n}_proj.weight"
        for i in range(2)
        for e in (0, 1)
        for n in ("gate", "up", "down")
    }
