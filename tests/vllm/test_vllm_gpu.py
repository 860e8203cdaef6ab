"""Colocated vLLM on a GPU (CUDA vLLM installed): sleep frees the GPU for training, a weight update
wakes only the weights, the next generate wakes the KV cache, and the engine then samples from the
new weights. Skipped without CUDA or without vLLM (not runnable on the CPU CI)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed")

from tests.e2e.test_rl_cli import data  # noqa: E402, F401  (a fixture)
from tests.vllm.test_vllm_rl import torchrun_vllm_rl  # noqa: E402

pytestmark = pytest.mark.gpu


def test_sleep_update_wake_cycle(tiny_model_dir):
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    from megatron_t1.rollout.engine import SamplingParams
    from megatron_t1.rollout.vllm_engine import VLLMEngine

    eng = VLLMEngine.launch(
        tiny_model_dir,
        dtype="bfloat16",
        max_model_len=256,
        gpu_memory_utilization=0.3,
        enable_sleep_mode=True,
    )
    assert eng.sleep_mode
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=0)
    assert len(eng.generate([[1, 2, 3]], 4, params)[0].completions) == 4
    free_awake = torch.cuda.mem_get_info()[0]
    eng.sleep()
    free_asleep = torch.cuda.mem_get_info()[0]
    assert free_asleep - free_awake > 1 << 30  # the KV cache (30% of the GPU) is released

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    torch.manual_seed(5)
    other = Qwen2ForCausalLM(base.config).eval()
    eng.update_weights(iter(other.state_dict().items()))
    assert eng._asleep == {"kv_cache"}  # weights woken for the update, KV cache still free
    seqs = [[1, 5, 9, 200, 33, 7, 7, 100]]
    got = torch.stack(eng.score(seqs)).float()  # wakes the KV cache
    assert not eng._asleep
    with torch.no_grad():
        logits = other(torch.tensor(seqs)).logits[:, :-1].float()
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(seqs)[:, 1:, None])[..., 0]
    assert (got - ref).abs().mean() < 0.05  # bf16 engine vs fp32 reference
    eng.close()


@pytest.mark.dist
def test_rl_with_two_colocated_engines_on_two_gpus_sleeps_and_wakes(data, tmp_path):  # noqa: F811
    """torchrun over 2 GPUs: an engine per GPU (vLLM external launcher, 2 data-parallel replicas), each
    asleep while the trainer runs (the memory it gives back is logged), woken by the weight sync and
    the rollout, in parity after every step."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    metrics = torchrun_vllm_rl(data, tmp_path, "run.device=cuda", timeout=900)
    for m in metrics.values():
        assert m["rollout/engines"] == 2 and m["sync/parity_mean_abs"] < 1e-2, m
        assert m["rollout/gpu_freed_gib"] > 0.1, m  # the KV cache went back to the trainer
    keys = ("rollout_s", "sync/gb_per_s", "rollout/gpu_freed_gib")
    print({k: [m[k] for m in metrics.values()] for k in keys})
