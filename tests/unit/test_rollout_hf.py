"""The HF (transformers) rollout engine: K samples per prompt whose log-probs are those of the
distribution they were sampled from (checked against a plain float64 full forward pass), finish
reasons, seeds (per prompt: a prompt's samples do not depend on the rest of the batch), the
inverse-CDF draw, in-place weight updates, bad input, and a crash mid-generate with a restart."""

from __future__ import annotations

import pytest
import torch

from megatron_t1.rollout.engine import (
    EngineError,
    RestartableEngine,
    RolloutEngine,
    SamplingParams,
    prompt_seeds,
    sample_seed,
)
from megatron_t1.rollout.hf_engine import HFEngine, filtered_scores, inverse_cdf
from megatron_t1.rollout.placement import deal, merge

VOCAB = 512


@pytest.fixture(scope="module")
def tokenizer():
    from megatron_t1.data.synthetic import make_sft_examples
    from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer

    return train_tokenizer(chat_corpus(make_sft_examples(200, 0)), VOCAB)


def tiny_model(seed: int, *, tied: bool = True, std: float = 0.2):
    """A random 2-layer Qwen2 (peaked distributions via a large init std)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        initializer_range=std,
    )
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def engine(tokenizer):
    torch.set_num_threads(1)
    return HFEngine(tiny_model(0), tokenizer)


def reference_filter(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float):
    """Plain float64 reference of the sampling distribution's log-probs, one row at a time."""
    out = torch.empty_like(logits, dtype=torch.float64)
    for i, row in enumerate(logits.double()):
        z = row / temperature
        keep = torch.ones_like(z, dtype=torch.bool)
        if top_k > 0:
            keep &= z >= torch.sort(z, descending=True).values[top_k - 1]
        if top_p < 1.0:
            p = torch.softmax(torch.where(keep, z, torch.tensor(-torch.inf, dtype=z.dtype)), 0)
            order = torch.argsort(p, descending=True)
            mass, kept = 0.0, torch.zeros_like(keep)
            for j in order.tolist():
                if mass >= top_p:
                    break
                kept[j] = True
                mass += float(p[j])
            keep &= kept
        if min_p > 0.0:
            p = torch.softmax(torch.where(keep, z, torch.tensor(-torch.inf, dtype=z.dtype)), 0)
            keep &= p >= min_p * p.max()
        out[i] = torch.log_softmax(torch.where(keep, z, torch.tensor(-torch.inf, dtype=z.dtype)), 0)
    return out


def forward_logprobs(model, prompt: list[int], tokens: list[int], **filt) -> torch.Tensor:
    """log-prob of each generated token from ONE full forward of prompt + tokens (no cache, no pad)."""
    full = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(full).logits[0, len(prompt) - 1 : -1].float()
    ref = reference_filter(logits, **filt)
    return ref.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def test_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, RolloutEngine)


@pytest.mark.parametrize(
    "filt",
    [
        dict(temperature=1.2, top_k=-1, top_p=1.0, min_p=0.0),  # T1's RL setting
        dict(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05),
    ],
)
def test_k_samples_with_logprobs_of_the_sampling_distribution(engine, tokenizer, filt):
    from megatron_t1.data.synthetic import prompt_messages

    text = tokenizer.apply_chat_template(
        prompt_messages("Compute 47 + 385 - 129."), add_generation_prompt=True, tokenize=False
    )
    # Prompts of different lengths (left padding inside the batch), as text and as token ids.
    prompts = [text, [5, 9, 11], list(range(100, 140))]
    params = SamplingParams(max_tokens=20, seed=7, **filt)
    out = engine.generate(prompts, 4, params)
    assert len(out) == 3 and all(len(r.completions) == 4 for r in out)
    assert out[0].prompt_token_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    worst = 0.0
    for r in out:
        assert len({tuple(c.token_ids) for c in r.completions}) > 1
        for c in r.completions:
            assert 0 < len(c.token_ids) == len(c.logprobs) <= 20
            ref = forward_logprobs(
                engine.model,
                r.prompt_token_ids,
                c.token_ids,
                **{k: (v if k != "top_k" else max(v, 0)) for k, v in filt.items()},
            )
            assert torch.isfinite(ref).all()  # every sampled token was allowed by the filters
            worst = max(worst, (ref - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max().item())
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
    assert worst < 2e-5


def test_filtered_scores_against_reference():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(6, 50, generator=g)
    for t, k, p, m in [(1.0, -1, 1.0, 0.0), (1.3, 5, 1.0, 0.0), (0.8, -1, 0.6, 0.0), (1.0, 10, 0.9, 0.1)]:
        got = torch.log_softmax(filtered_scores(logits, SamplingParams(t, top_p=p, top_k=k, min_p=m)), -1)
        ref = reference_filter(logits, t, max(k, 0), p, m)
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        fin = torch.isfinite(ref)
        assert (got.double()[fin] - ref[fin]).abs().max() < 1e-5


def test_finish_reasons_length_eos_and_stop_string(tokenizer):
    model = tiny_model(1)
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    base = HFEngine(model, tokenizer).generate([[7, 8, 9]], 1, greedy)[0].completions[0]
    assert base.finish_reason == "length" and base.truncated and len(base.token_ids) == 12
    # Make the 5th greedy token the EOS: generation must stop right after its first occurrence.
    eos = base.token_ids[4]
    model.generation_config.eos_token_id = eos
    stopped = HFEngine(model, tokenizer).generate([[7, 8, 9]], 1, greedy)[0].completions[0]
    first = base.token_ids.index(eos)
    assert stopped.token_ids == base.token_ids[: first + 1]
    assert stopped.finish_reason == "stop" and not stopped.truncated
    # A stop string: the sample ends with the token that completes it (kept in the output).
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    text = tokenizer.decode(base.token_ids)
    needle = text[len(text) // 2 : len(text) // 2 + 2]
    if not needle.strip():
        pytest.skip("greedy text has no usable stop string")
    hit = HFEngine(model, tokenizer).generate(
        [[7, 8, 9]], 1, SamplingParams(0.0, max_tokens=12, stop=(needle,))
    )
    c = hit[0].completions[0]
    k = next(i for i in range(1, 13) if needle in tokenizer.decode(base.token_ids[:i]))
    assert c.token_ids == base.token_ids[:k] and c.finish_reason == "stop"


def test_rows_ending_at_different_steps_match_solo_generation(tokenizer):
    """Finished rows are dropped from the batch and its KV cache mid-generation: every row must still
    equal the same prompt decoded alone, with the log-probs of a plain full forward."""
    model = tiny_model(2)
    prompts = [[7, 8, 9], list(range(30, 52)), [5, 9, 11, 13, 200], list(range(100, 112))]
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    base = [
        c.token_ids for r in HFEngine(model, tokenizer).generate(prompts, 1, greedy) for c in r.completions
    ]
    # The EOS: the token that ends the most rows at *different* steps (some rows may never hit it).
    firsts = {t: {row.index(t) for row in base if t in row} for row in base for t in row}
    eos = max(firsts, key=lambda t: (len(firsts[t]), -min(firsts[t])))
    assert len(firsts[eos]) >= 2, "the random model gives no token that ends rows at different steps"
    model.generation_config.eos_token_id = eos
    eng = HFEngine(model, tokenizer)
    batch = eng.generate(prompts, 3, greedy)  # 12 rows: prefill once per prompt, cache repeated 3x
    for p, row, r in zip(prompts, base, batch):
        want = row[: row.index(eos) + 1] if eos in row else row
        for c in r.completions:
            assert c.token_ids == want
            assert c.finish_reason == ("stop" if eos in row else "length")
            ref = forward_logprobs(model, p, c.token_ids, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
            assert (ref - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max() < 2e-5
        solo = eng.generate([p], 1, greedy)[0].completions[0]
        assert solo.token_ids == want


def test_seeds_reproduce_and_leave_global_rng_alone(engine):
    p = SamplingParams(temperature=1.2, max_tokens=10, seed=3)
    a = engine.generate([[1, 2, 3]], 3, p)[0].completions
    state = torch.get_rng_state()
    b = engine.generate([[1, 2, 3]], 3, p)[0].completions
    assert torch.equal(state, torch.get_rng_state())
    c = engine.generate([[1, 2, 3]], 3, SamplingParams(temperature=1.2, max_tokens=10, seed=4))[0].completions
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def _ids(out):
    return [[c.token_ids for c in r.completions] for r in out]


def test_samples_depend_on_their_prompt_and_seed_only(engine):
    """The RL loop deals a step's prompts to several engines: each prompt's samples must be those one
    engine gives for the whole batch (other prompts, batch size and padding width do not matter)."""
    prompts = [[5, 9, 11], list(range(30, 52)), [7, 8, 9, 10], list(range(100, 112)), [3]]
    seeds = [sample_seed(1234, 3, i) for i in range(len(prompts))]
    p = SamplingParams(temperature=1.2, max_tokens=16)
    together = engine.generate(prompts, 4, p, seeds=seeds)
    split = merge(
        [
            engine.generate([prompts[i] for i in idx], 4, p, seeds=[seeds[i] for i in idx])
            for idx in deal(5, 2)
        ],
        len(prompts),
    )
    solo = HFEngine(engine.model, engine.tokenizer, max_batch_sequences=4).generate(
        prompts, 4, p, seeds=seeds
    )
    assert _ids(together) == _ids(split) == _ids(solo)
    for a, b in zip(together, solo):
        for x, y in zip(a.completions, b.completions):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)
    assert len({tuple(t) for t in _ids(together)[0]}) > 1  # the 4 samples of a prompt differ
    other = list(seeds)
    other[2] = sample_seed(1234, 3, 99)
    changed = _ids(engine.generate(prompts, 4, p, seeds=other))
    assert changed[2] != _ids(together)[2]
    assert changed[:2] + changed[3:] == _ids(together)[:2] + _ids(together)[3:]


def test_inverse_cdf_draws_the_step_that_holds_u():
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]]).expand(6, 4) * 3  # rows need not sum to 1
    u = torch.tensor([0.0, 0.19, 0.21, 0.69, 0.71, 0.999999])
    assert inverse_cdf(probs, u).tolist() == [0, 0, 2, 2, 3, 3]  # the empty step (token 1) never
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g)
    logits[::7] = -torch.inf
    p = logits.softmax(-1)
    n = 200_000
    tok = inverse_cdf(p.expand(n, 50), torch.rand(n, generator=g))
    freq = torch.bincount(tok, minlength=50).double() / n
    assert freq[p == 0].sum() == 0
    sigma = (p.double() * (1 - p.double()) / n).sqrt()
    assert ((freq - p.double()).abs() <= 4 * sigma + 1e-12).all()


def test_prompt_seeds():
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3) != sample_seed(1, 3, 2)
    many = {sample_seed(1234, step, i) for step in range(50) for i in range(64)}
    assert len(many) == 50 * 64 and all(0 <= x < 2**62 for x in many)
    assert prompt_seeds(SamplingParams(seed=5), 3) == [sample_seed(5, i) for i in range(3)]
    assert prompt_seeds(SamplingParams(seed=5), 2, [7, 8]) == [7, 8]
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        prompt_seeds(SamplingParams(), 3, [1, 2])


def test_update_weights_in_place(tokenizer):
    eng = HFEngine(tiny_model(2), tokenizer)
    other = tiny_model(3)
    seqs = [[1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 5, 4]]
    with torch.no_grad():
        ref = torch.log_softmax(other(torch.tensor(seqs)).logits[:, :-1], -1)
    ref = ref.gather(-1, torch.tensor(seqs)[:, 1:, None])[..., 0]
    assert (torch.stack(eng.score(seqs)) - ref).abs().max() > 0.1
    named = list(other.state_dict().items())
    assert "lm_head.weight" in dict(named)  # the tied head, sent too: harmless here
    assert eng.update_weights(iter(named)) == len(named)
    assert (torch.stack(eng.score(seqs)) - ref).abs().max() < 1e-5
    with pytest.raises(ValueError, match="model.layers.9.mlp.up_proj.weight is not a tensor"):
        eng.update_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(3,\)"):
        eng.update_weights([("model.norm.weight", torch.zeros(3))])


def test_bad_input_is_rejected_with_the_reason(engine):
    with pytest.raises(ValueError, match=r"prompt 1: token ids \[512\] outside the vocabulary"):
        engine.generate([[1, 2], [3, 512]], 2, SamplingParams())
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], 2, SamplingParams())
    with pytest.raises(ValueError, match="n must be >= 1"):
        engine.generate([[1]], 0, SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    assert SamplingParams(stop="</s>").stop == ("</s>",)


def test_sampling_params_from_rollout_config():
    from megatron_t1.config import RolloutConfig

    rc = RolloutConfig()
    p = SamplingParams.from_config(rc, seed=5)
    assert p.temperature == rc.temperature and p.max_tokens == rc.max_new_tokens and p.seed == 5
    assert p.full_distribution  # RL default: the full tempered distribution


def test_crash_mid_generate_reports_engine_error_and_restarts(tokenizer):
    built = []

    def factory():
        built.append(HFEngine(tiny_model(4), tokenizer))
        return built[-1]

    managed = RestartableEngine(factory, name="hf engine")
    model = built[0].model
    calls = {"n": 0}
    inner = model.forward

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the third decoding step
            raise RuntimeError("simulated worker crash")
        return inner(*args, **kwargs)

    model.forward = failing_forward
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=0)
    with pytest.raises(
        EngineError, match="hf engine failed in generate: RuntimeError: simulated worker crash"
    ):
        managed.generate([[1, 2, 3]], 2, params)
    assert managed.needs_weights and managed.engine is None
    with pytest.raises(EngineError, match="not running"):
        managed.score([[1, 2, 3]])
    managed.restart()
    assert managed.restarts == 1 and len(built) == 2
    out = managed.generate([[1, 2, 3]], 2, params)
    assert len(out[0].completions) == 2
    assert managed.update_weights(iter(tiny_model(5).state_dict().items())) > 0
    assert not managed.needs_weights
    # Rejected input is the caller's error: the engine keeps running.
    with pytest.raises(ValueError):
        managed.generate([[1, 99999]], 1, params)
    assert managed.engine is not None
    managed.close()


def test_build_engine_from_config(tokenizer, tmp_path):
    from megatron_t1.config import RolloutConfig
    from megatron_t1.rollout.engine import build_engine

    tiny_model(6).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    eng = build_engine(RolloutConfig(engine="hf"), str(tmp_path))
    assert isinstance(eng, HFEngine) and eng.tokenizer.eos_token_id == tokenizer.eos_token_id
    out = eng.generate(["Compute 1 + 1."], 2, SamplingParams(max_tokens=4, seed=0))
    assert len(out[0].completions) == 2
    with pytest.raises(ValueError, match="rollout.engine"):
        build_engine(type("C", (), {"engine": "tgi"})(), str(tmp_path))


def test_update_weights_fills_fused_experts(tokenizer, tmp_path):
    """transformers >= 5 fuses a Qwen3-MoE layer's experts (``gate_up_proj`` [E, 2F, H],
    ``down_proj`` [E, H, F]); the update arrives per expert, under the checkpoint's names."""
    from tests.unit.test_convert_ckpt import build_hf_model, hf_tensors

    src = build_hf_model("qwen3_moe", seed=0)
    src.save_pretrained(tmp_path / "src")
    named = hf_tensors(tmp_path / "src")  # per-expert names, as our export and vLLM's loader use
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in named
    eng = HFEngine(build_hf_model("qwen3_moe", seed=1), tokenizer)
    seqs = [[1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 5, 4]]
    with torch.no_grad():
        ref = torch.log_softmax(src(torch.tensor(seqs)).logits[:, :-1], -1)
    ref = ref.gather(-1, torch.tensor(seqs)[:, 1:, None])[..., 0]
    assert (torch.stack(eng.score(seqs)) - ref).abs().max() > 0.1
    assert eng.update_weights(iter(named.items())) == len(named)
    assert (torch.stack(eng.score(seqs)) - ref).abs().max() < 1e-5
    # gate and up are different halves: swapping them is not the same model
    swapped = {
        n.replace("gate_proj", "TMP").replace("up_proj", "gate_proj").replace("TMP", "up_proj"): t
        for n, t in named.items()
    }
    eng.update_weights(iter(swapped.items()))
    assert (torch.stack(eng.score(seqs)) - ref).abs().max() > 1e-3
    with pytest.raises(ValueError, match="experts.4.down_proj.weight is not a tensor"):
        eng.update_weights([("model.layers.0.mlp.experts.4.down_proj.weight", torch.zeros(64, 32))])
