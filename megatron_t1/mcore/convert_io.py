"""The Megatron side of conversion: HF weights into live model chunks, logits for ``verify``.

The checkpoint *files* are written and read by the pure :mod:`megatron_t1.convert.torch_dist` (no
megatron import, so ``convert_ckpt hf-to-mcore`` / ``mcore-to-hf`` start fast and run where
Megatron does not); its metadata helpers are re-exported here. This module adds what needs a
built ``GPTModel``:

* :func:`load_hf_into_model`: copy an HF folder's weights into this rank's chunks (any TP/PP),
  reading only the tensors of its pipeline stage.
* :func:`megatron_logits`: a forward pass over TP/PP ranks (point-to-point between stages, logits
  gathered over TP) returning full-vocabulary logits; :func:`megatron_token_logprobs` the token
  log-probs from them on every stage (the weight sync's parity probe).
* :func:`verify`: spawn ``tp * pp`` ranks, load a converted checkpoint through
  ``mcore/checkpoint.py`` (the path ``checkpoint.init_from`` takes), compare logits with
  transformers on the same tokens.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_t1.config import Config, ConfigError, DataConfig, ModelConfig, ParallelConfig, RunConfig
from megatron_t1.convert.hf_io import SafetensorsReader
from megatron_t1.convert.maps import ConvertError, Dims, from_hf
from megatron_t1.convert.registry import model_config_from_hf_dir
from megatron_t1.convert.sharding import (
    layer_offset,
    sequential_expert_name,
    shard_tp,
    shift_expert,
    shift_layer,
)
from megatron_t1.convert.torch_dist import (  # noqa: F401  (re-exported for mcore/checkpoint.py)
    FORMAT,
    METADATA_FILE,
    MODEL_PREFIX,
    read_checkpoint_metadata,
    resolve_checkpoint_dir,
    write_checkpoint_metadata,
)
from megatron_t1.mcore.model import unwrap

_TE_PARAM_NAMES = {
    ".self_attention.linear_qkv.layer_norm_weight": ".input_layernorm.weight",
    ".mlp.linear_fc1.layer_norm_weight": ".pre_mlp_layernorm.weight",
}
_COMPARED_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "vocab_size",
    "add_qkv_bias",
    "add_bias_linear",
    "qk_layernorm",
    "num_experts",
    "moe_router_topk",
    "moe_ffn_hidden_size",
    "norm_topk_prob",
    "tie_word_embeddings",
)


def _local_spec_name(name: str) -> str:
    """TE-spec parameter names -> the local-spec names the maps use."""
    for te, local in _TE_PARAM_NAMES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def global_map_name(local_name: str, layer_offset: int, expert_offset: int) -> str:
    """A parameter name of this rank's model chunk -> the name the converter maps use: global layer
    index (+ the chunk's ``layer_offset``), ``SequentialMLP`` expert names (grouped ones renamed) with
    the global expert index (+ this EP rank's ``expert_offset``), local-spec norm names."""
    name = shift_layer(sequential_expert_name(local_name), layer_offset)
    return _local_spec_name(shift_expert(name, expert_offset))


def _check_same_model(ours: ModelConfig, hf: ModelConfig, where: str) -> None:
    for k in _COMPARED_FIELDS:
        if getattr(ours, k) != getattr(hf, k):
            raise ConfigError(
                f"{where}: model.{k}={getattr(hf, k)!r} there but {getattr(ours, k)!r} in the config"
            )
    if ours.query_groups != hf.query_groups:
        raise ConfigError(
            f"{where}: num_query_groups {hf.query_groups} there but {ours.query_groups} in the config"
        )


@torch.no_grad()
def load_hf_into_model(
    model_chunks: Sequence[torch.nn.Module], hf_dir: str | os.PathLike, cfg: Config
) -> None:
    """Copy the weights of an HF folder into this rank's model chunks (after ``init_parallel``).

    Each parameter is built as the full Megatron tensor from its HF parts, then this rank's TP shard
    is taken (:func:`megatron_t1.convert.sharding.shard_tp`); padded vocabulary rows become zeros.
    Memory: one full tensor at a time.
    """
    spec, hf_mc, _ = model_config_from_hf_dir(hf_dir)
    _check_same_model(cfg.model, hf_mc, str(hf_dir))
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    # EP: this rank holds experts [ep_rank * E / EP, (ep_rank + 1) * E / EP), indexed from 0 locally
    expert_offset = ps.get_expert_model_parallel_rank() * (cfg.model.num_experts or 0) // cfg.parallel.ep
    maps = {tm.mcore: tm for tm in spec.tensor_maps(cfg.model, tp=tp)}
    d = Dims.of(cfg.model, tp=tp)
    reader = SafetensorsReader(hf_dir)
    for vp_stage, chunk in enumerate(model_chunks):
        model = unwrap(chunk)
        offset = layer_offset(d.layers, pp, pp_rank, vpp, vp_stage if vpp else None)
        for local_name, param in model.named_parameters():
            name = global_map_name(local_name, offset, expert_offset)
            if name == "output_layer.weight" and d.tied:
                name = "embedding.word_embeddings.weight"  # the last stage's copy of the tied embedding
            tm = maps.get(name)
            if tm is None:
                raise ConvertError(f"Megatron parameter {local_name} ({name}) has no HF source in {hf_dir}")
            shard = shard_tp(from_hf(tm, [reader.get(h) for h in tm.hf], d), tm.tp, tp, tp_rank, name=name)
            if tuple(shard.shape) != tuple(param.shape):
                raise ConvertError(
                    f"{name}: TP shard {tuple(shard.shape)} but the parameter is {tuple(param.shape)}"
                )
            param.copy_(shard)


@torch.no_grad()
def megatron_logits(
    model_chunks: Sequence[torch.nn.Module], tokens: torch.Tensor, cfg: Config
) -> torch.Tensor | None:
    """Forward ``tokens`` ``[b, s]`` through TP/PP ranks; ``[b, s, vocab_size]`` float32 logits on
    the last pipeline stage (gathered over TP, padding dropped), None on other stages.

    Stages hand hidden states ``[s, b, H]`` on with point-to-point send / recv (no schedule: one
    micro-batch, forward only). Virtual pipeline stages are not supported here.
    """
    if len(model_chunks) != 1:
        raise ConfigError("megatron_logits: virtual pipeline stages are not supported")
    model = unwrap(model_chunks[0])
    model.eval()
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    b, s = tokens.shape
    pos = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(s, b, cfg.model.hidden_size, dtype=next(model.parameters()).dtype, device=device)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(tokens, pos, attention_mask=None)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out[..., : cfg.model.vocab_size].float().cpu()


@torch.no_grad()
def megatron_token_logprobs(
    model_chunks: Sequence[torch.nn.Module], tokens: torch.Tensor, cfg: Config
) -> torch.Tensor:
    """``log p(x_t | x_<t)`` ``[b, s - 1]`` float32 (CPU, untempered) of ``tokens`` ``[b, s]``, on
    every rank of the pipeline group: :func:`megatron_logits` on the last stage, then broadcast
    over PP. The chunks' train / eval modes are restored afterwards."""
    modes = [c.training for c in model_chunks]
    try:
        logits = megatron_logits(model_chunks, tokens, cfg)
    finally:
        for c, m in zip(model_chunks, modes):
            c.train(m)
    b, s = tokens.shape
    out = torch.empty(b, s - 1, dtype=torch.float32)
    if logits is not None:
        out.copy_(torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, tokens[:, 1:, None])[..., 0])
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp > 1:
        buf = out.to(next(model_chunks[0].parameters()).device)
        dist.broadcast(buf, group=ps.get_pipeline_model_parallel_group(), group_src=pp - 1)
        out = buf.cpu()
    return out


def hf_logits(hf_dir: str | os.PathLike, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' float32 logits ``[b, s, V]`` for ``tokens`` (CPU)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def compare_logits(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """``max_abs_diff`` and ``top1_agreement`` (fraction of positions with the same argmax)."""
    if ref.shape != got.shape:
        raise ConvertError(f"logits shapes differ: {tuple(ref.shape)} vs {tuple(got.shape)}")
    return {
        "max_abs_diff": (ref - got).abs().max().item(),
        "top1_agreement": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
        "positions": int(ref.shape[0] * ref.shape[1]),
    }


def verify_config(
    mcore_dir: str | os.PathLike,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    device: str = "cpu",
    seq_len: int = 32,
) -> Config:
    """The run config of a converted checkpoint at layout ``tp`` x ``pp`` (x ``ep`` experts; fp32)."""
    meta = read_checkpoint_metadata(resolve_checkpoint_dir(mcore_dir))
    # fp32, and grouped GEMM only where this machine has it (the checkpoint does not depend on it)
    mc = ModelConfig(**{**meta["model"], "precision": "fp32", "hf_config": None, "moe_grouped_gemm": None})
    return layout_config(mc, tp=tp, pp=pp, ep=ep, device=device, seq_len=seq_len)


def layout_config(
    mc: ModelConfig, *, tp: int = 1, pp: int = 1, ep: int = 1, device: str = "cpu", seq_len: int = 32
) -> Config:
    """A run config of model ``mc`` at layout ``tp`` x ``pp`` (x ``ep`` experts) for a forward check
    (validated)."""
    cfg = Config(
        model=mc,
        parallel=ParallelConfig(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            timeout_minutes=5,
        ),
        run=RunConfig(device=device),
        data=DataConfig(seq_length=min(seq_len, mc.max_position_embeddings)),
    )
    cfg.validate()
    return cfg


def _verify_worker(rank: int, world: int, port: int, args: dict) -> None:
    """One rank of :func:`verify` (spawned; module level so that spawn can import it)."""
    from megatron_t1.mcore.checkpoint import load_checkpoint
    from megatron_t1.mcore.model import build_model
    from megatron_t1.mcore.parallel import destroy_parallel, init_parallel

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(args.get("threads", 1))
    ckpt = resolve_checkpoint_dir(args["mcore_dir"])
    cfg = verify_config(
        ckpt, tp=args["tp"], pp=args["pp"], ep=args["ep"], device=args["device"], seq_len=args["seq_len"]
    )
    init_parallel(cfg.parallel, seed=0, device=args["device"])
    try:
        chunks = build_model(cfg, wrap_ddp=False)
        load_checkpoint(ckpt, cfg, chunks, weights_only=True)
        gen = torch.Generator().manual_seed(args["seed"])
        tokens = torch.randint(0, cfg.model.vocab_size, (args["batch"], args["seq_len"]), generator=gen)
        logits = megatron_logits(chunks, tokens, cfg)  # every DP (= EP) rank: the same tokens
        if (
            logits is not None
            and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0
        ):
            result = compare_logits(hf_logits(args["hf_dir"], tokens), logits)
            if cfg.model.num_experts:  # SequentialMLP, or TEGroupedMLP with grouped GEMM
                result["experts"] = type(unwrap(chunks[0]).decoder.layers[0].mlp.experts).__name__
            Path(args["result"]).write_text(json.dumps(result))
    finally:
        destroy_parallel()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def verify(
    hf_dir: str | os.PathLike,
    mcore_dir: str | os.PathLike,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    seq_len: int = 32,
    batch: int = 2,
    seed: int = 0,
    device: str = "cpu",
    timeout_s: float = 1800.0,
) -> dict:
    """Run the HF model and the converted checkpoint (``tp * pp * ep`` spawned ranks, gloo on CPU;
    with ``ep`` > 1 the experts are split over ``ep`` data-parallel ranks that all run the same tokens,
    through the all-to-all dispatcher) on the same random tokens; returns :func:`compare_logits`'s dict."""
    import torch.multiprocessing as mp

    spec, hf_mc, _ = model_config_from_hf_dir(hf_dir)
    cfg = verify_config(mcore_dir, tp=tp, pp=pp, ep=ep, device=device, seq_len=seq_len)
    _check_same_model(cfg.model, hf_mc, str(hf_dir))
    world = tp * pp * ep
    with tempfile.TemporaryDirectory() as tmp:
        args = {
            "hf_dir": str(hf_dir),
            "mcore_dir": str(mcore_dir),
            "tp": tp,
            "pp": pp,
            "ep": ep,
            "seq_len": seq_len,
            "batch": batch,
            "seed": seed,
            "device": device,
            "result": str(Path(tmp) / "result.json"),
            "threads": max(1, (os.cpu_count() or 1) // world),
        }
        ctx = mp.start_processes(
            _verify_worker, args=(world, free_port(), args), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"verify: ranks did not finish within {timeout_s:.0f} s")
        result_file = Path(args["result"])
        if not result_file.is_file():
            raise ConvertError("verify: no rank reported logits")
        return json.loads(result_file.read_text())


__all__ = [
    "FORMAT",
    "METADATA_FILE",
    "MODEL_PREFIX",
    "compare_logits",
    "hf_logits",
    "load_hf_into_model",
    "megatron_logits",
    "megatron_token_logprobs",
    "read_checkpoint_metadata",
    "verify",
    "verify_config",
    "write_checkpoint_metadata",
]
