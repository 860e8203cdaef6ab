"""Distributed checkpoints (Megatron ``dist_checkpointing``, torch_dist format): save, load, resume.

Layout of a run folder's checkpoints::

    runs/NAME/checkpoints/
      step_0000010/            one complete checkpoint (torch_dist files + our metadata)
        megatron_t1.json       {"format", "step", "model": ModelConfig fields, "tp", "pp", ...}
        common.pt, *.distcp    Megatron's files: model under keys "model.*", optimizer states
        rng/rank_00000.pt      per-rank RNG (restored only when the world size matches)
      latest                   text file naming the newest complete step folder

A checkpoint is complete or absent: every rank writes into ``step_X.tmp/``; after a barrier rank 0
writes the metadata, renames the folder and only then moves ``latest`` (temp file + rename). A
crash at any point leaves either the previous ``latest`` or the new one, never a half checkpoint
that ``latest`` names. The torch_dist format reshards: a checkpoint saved at one TP/PP loads at
another.

``init_from`` (weights only, starts a new run) and resume (the run's own ``latest``: model,
optimizer, scheduler, RNG, step and data position) are separate paths; a run with a ``latest``
never silently restarts from ``init_from``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel

from megatron_t1.atomic import publish_dir, write_text_atomic
from megatron_t1.config import Config, ConfigError

# One source for the on-disk format, shared with the offline converter.
from megatron_t1.convert.maps import ConvertError
from megatron_t1.convert.torch_dist import (
    FORMAT,  # noqa: F401  (re-exported: one source for the format)
    METADATA_FILE,  # noqa: F401
    MODEL_PREFIX,
    read_checkpoint_metadata,
    resolve_checkpoint_dir,
    write_checkpoint_metadata,
)
from megatron_t1.errors import CheckpointError
from megatron_t1.mcore.model import unwrap


def _model_sharded_sd(chunks: Sequence[torch.nn.Module]) -> dict:
    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict(prefix=MODEL_PREFIX)}
    return {f"model{i}": unwrap(c).sharded_state_dict(prefix=MODEL_PREFIX) for i, c in enumerate(chunks)}


def write_metadata(ckpt_dir: str | os.PathLike, cfg: Config, *, step: int, extra: dict | None = None) -> None:
    """Write ``megatron_t1.json`` atomically (the converter's layout, plus what lets mcore-to-hf export
    a trained checkpoint without an --hf-template)."""
    from megatron_t1.convert.registry import spec_for_arch

    write_checkpoint_metadata(
        ckpt_dir,
        cfg.model,
        tp=cfg.parallel.tp,
        pp=cfg.parallel.pp,
        step=step,
        hf_architecture=spec_for_arch(cfg.model.arch).hf_architecture,
        key_prefix=MODEL_PREFIX,
        **(extra or {}),
    )


def read_metadata(ckpt_dir: str | os.PathLike) -> dict:
    """Read and check ``megatron_t1.json``; a folder without it is not a complete checkpoint
    (an interrupted save, or not ours): a :class:`CheckpointError` naming the folder."""
    try:
        return read_checkpoint_metadata(ckpt_dir)
    except ConvertError as e:
        raise CheckpointError(str(e)) from None


def resolve_init_from(path: str | os.PathLike) -> Path:
    """``checkpoint.init_from`` may name a checkpoint folder, a run's ``checkpoints/`` (its ``latest``)
    or a run folder (its ``checkpoints/latest``)."""
    p = Path(path)
    if (p / "checkpoints" / "latest").is_file():
        p = p / "checkpoints"
    return resolve_checkpoint_dir(p)


def check_compatible(meta: dict, cfg: Config, where: str) -> None:
    """The architecture in a checkpoint must equal the run's (TP/PP may differ: torch_dist reshards)."""
    keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size")
    for k in keys + ("num_query_groups", "tie_word_embeddings", "add_qkv_bias"):
        ours = getattr(cfg.model, k)
        theirs = meta["model"].get(k)
        if k == "num_query_groups":
            ours, theirs = cfg.model.query_groups, theirs or meta["model"]["num_attention_heads"]
        if theirs != ours:
            raise ConfigError(f"{where}: checkpoint has model.{k}={theirs!r} but the config says {ours!r}")
    # MoE: a different expert count or width would fail deep in dist_checkpointing, or (fewer experts
    # in the config) load a subset silently
    m = meta["model"]
    theirs_e, ours_e = m.get("num_experts"), cfg.model.num_experts
    if theirs_e != ours_e:
        raise ConfigError(
            f"{where}: checkpoint has model.num_experts={theirs_e!r} but the config says {ours_e!r}"
        )
    if ours_e is not None:
        theirs_f = m.get("moe_ffn_hidden_size") or m.get("ffn_hidden_size")
        if theirs_f != cfg.model.expert_ffn:
            raise ConfigError(
                f"{where}: checkpoint's experts have width {theirs_f!r} but the config says "
                f"{cfg.model.expert_ffn!r} (model.moe_ffn_hidden_size)"
            )


PLAIN_OPTIMIZER = "plain"
"""``optimizer.format`` in the metadata of a checkpoint saved by the plain (not distributed) optimizer,
and of every checkpoint written before the field existed."""


def _optimizer_layout(cfg: Config) -> dict:
    """What a saved optimizer state depends on: its format and, for ``dp_reshardable``, the layout."""
    p = cfg.parallel
    fmt = cfg.checkpoint.optimizer_format if p.use_distributed_optimizer else PLAIN_OPTIMIZER
    return {"format": fmt, "tp": p.tp, "pp": p.pp, "ep": p.ep, "vpp": p.virtual_pipeline_model_parallel_size}


def _optimizer_sd_metadata(fmt: str) -> dict | None:
    """The ``metadata`` for Megatron's ``optimizer.sharded_state_dict`` (None for the plain optimizer).

    Without it megatron-core 0.16.1's distributed optimizer falls back to its deprecated
    ``fully_sharded_model_space`` format, whose flattened ShardedTensors its own checkpointing then
    refuses ("ShardedTensor.flattened_range is not supported"): every save would fail.
    """
    return None if fmt == PLAIN_OPTIMIZER else {"distrib_optim_sharding_type": fmt}


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer the state a load writes into.

    megatron-core 0.16.1's distributed optimizer builds its sharded state dict for loading from the
    live state of its torch optimizer (the step count and the Adam moments of each shard), which
    torch's Adam only creates at its first step: loading into a fresh one fails on an assertion.
    Like Megatron's own FSDP path (``_init_optimizer_states_with_dummy_values``) we take one step with
    zero gradients; the load then overwrites every value that step set (main weights, moments, step).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(part, DistributedOptimizer) and not part.optimizer.state:
            part._init_optimizer_states_with_dummy_values()


@contextlib.contextmanager
def _torch_adam_steps_restored(optimizer):
    """While loading a distributed-optimizer state: give torch Adam's per-parameter "step" the saved one.

    Without an apex / TE optimizer (CPU, or a GPU without them) the step count lives in each
    parameter's state of torch's Adam. megatron-core 0.16.1 restores it into the param groups from
    the checkpoint, then copies each parameter's state tensors from the loaded ones, where "step"
    is missing (``fully_reshardable``: a ``KeyError``) or is the live optimizer's own
    (``dp_reshardable``: the 1 of :func:`_materialize_optimizer_state`'s step, so Adam's bias
    correction would restart; measured: resumed losses off by 5e-4). The step copied is the group's.
    It also hands every parameter the *same* step tensor, which torch's Adam then increments once per
    parameter at each step (measured: 2 -> 12 after one step of 10 parameters); on exit each
    parameter of ``optimizer`` gets a step of its own.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        group, order = self.model_param_group_index_map[model_param]
        pg = self.optimizer.param_groups[group]
        live = self.optimizer.state.get(pg["params"][order], {})
        if "step" in live and pg.get("step") is not None:
            tensors = {**tensors, "step": torch.tensor(float(pg["step"]), dtype=live["step"].dtype)}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(part, DistributedOptimizer):
            for state in part.optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].clone()


def check_optimizer_resumable(meta: dict, cfg: Config, where: str) -> str:
    """The format to load a checkpoint's optimizer state with; a :class:`CheckpointError` naming what
    to change when this run cannot (another optimizer kind or format, or a ``dp_reshardable`` state at
    another TP / PP / EP / VPP)."""
    saved = meta.get("optimizer", {"format": PLAIN_OPTIMIZER})
    if saved is None:
        raise CheckpointError(f"{where}: no optimizer state (saved with checkpoint.save_optimizer=false)")
    ours = _optimizer_layout(cfg)
    if saved["format"] != ours["format"]:

        def name(fmt: str) -> str:
            if fmt == PLAIN_OPTIMIZER:
                return "the plain optimizer (parallel.use_distributed_optimizer=false)"
            return f"the distributed optimizer with checkpoint.optimizer_format={fmt}"

        raise CheckpointError(
            f"{where}: its optimizer state was saved by {name(saved['format'])}, this run uses "
            f"{name(ours['format'])}; resume with the same setting, or start a new run from its weights "
            "(checkpoint.init_from)"
        )
    if saved["format"] == "dp_reshardable":
        keys = ("tp", "pp", "ep", "vpp")
        if any(saved.get(k) != ours[k] for k in keys):

            def show(d: dict) -> str:
                return " ".join(f"{k.upper()}={d.get(k)}" for k in keys)

            raise CheckpointError(
                f"{where}: its distributed-optimizer state (checkpoint.optimizer_format=dp_reshardable) "
                f"was saved at {show(saved)} and loads only at that layout, this run is {show(ours)}; "
                "resume at the saved layout (DP may differ), or save with optimizer_format=fully_reshardable "
                "to change it, or start a new run from its weights (checkpoint.init_from)"
            )
    return saved["format"]


def _marked(root: str | os.PathLike, marker_name: str) -> Path | None:
    """The step folder the marker file names, or None without a marker (raises if incomplete)."""
    marker = Path(root) / marker_name
    if not marker.is_file():
        return None
    path = Path(root) / marker.read_text().strip()
    read_metadata(path)  # raises if the marker points at something incomplete
    return path


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The folder ``latest`` names, or None when the run has not saved yet."""
    return _marked(root, "latest")


def step_dir_name(step: int) -> str:
    """The folder name of a run's checkpoint at ``step`` (``step_0000020``)."""
    return f"step_{step:07d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    cfg: Config,
    chunks: Sequence[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    *,
    state: dict[str, Any] | None = None,
    extra_sharded: dict | None = None,
    best: int | None = None,
) -> Path:
    """Save everything needed to resume at ``step``; returns the final folder.

    ``state`` is small picklable run state (data position, anchor step, metrics) saved once by
    rank 0; ``extra_sharded`` holds more sharded tensors (e.g. the anchor's weights). ``best``: the
    step of the run's best checkpoint (model selection): the ``best`` marker names it and pruning
    (``checkpoint.keep_last``) never deletes it.
    """
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f"{final.name}.tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    sharded = _model_sharded_sd(chunks)
    layout = _optimizer_layout(cfg) if optimizer is not None and cfg.checkpoint.save_optimizer else None
    if layout is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, metadata=_optimizer_sd_metadata(layout["format"])
        )
    if extra_sharded:
        sharded.update(extra_sharded)
    sharded["run_state"] = {
        "step": step,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "state": state or {},
    }
    dist_checkpointing.save(sharded, str(tmp))
    rng_dir = tmp / "rng"
    rng_dir.mkdir(exist_ok=True)
    torch.save(
        {
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        },
        rng_dir / f"rank_{rank:05d}.pt",
    )
    _barrier()
    if rank == 0:
        write_metadata(tmp, cfg, step=step, extra={"optimizer": layout})
        publish_dir(tmp, final)  # an old folder of this step (a rerun) is replaced only now
        _write_marker(root / "latest", final.name)
        protect = None if best is None else step_dir_name(best)
        if protect is not None:
            _write_marker(root / "best", protect)
        _prune(root, keep=cfg.checkpoint.keep_last, protect=protect)
    _barrier()
    return final


def _write_marker(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def _prune(root: Path, keep: int, protect: str | None = None) -> None:
    """Delete all but the newest ``keep`` step folders, and never the one named ``protect``."""
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in steps[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def best_checkpoint(root: str | os.PathLike) -> Path | None:
    """The folder ``best`` names (``checkpoint.keep_best``), or None when the run has not marked one."""
    return _marked(root, "best")


def load_checkpoint(
    ckpt_dir: str | os.PathLike,
    cfg: Config,
    chunks: Sequence[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    *,
    weights_only: bool = False,
    extra_sharded: dict | None = None,
) -> dict:
    """Load a checkpoint into ``chunks`` (and optimizer / scheduler / RNG unless ``weights_only``).

    Returns ``{"step": int, "state": dict, **loaded extra_sharded}``.
    """
    meta = read_metadata(ckpt_dir)
    check_compatible(meta, cfg, str(ckpt_dir))
    sharded = _model_sharded_sd(chunks)
    if not weights_only:
        if optimizer is not None:
            fmt = check_optimizer_resumable(meta, cfg, str(ckpt_dir))
            _materialize_optimizer_state(optimizer)
            sharded["optimizer"] = optimizer.sharded_state_dict(
                sharded, is_loading=True, metadata=_optimizer_sd_metadata(fmt)
            )
        sharded["run_state"] = None  # common (non-sharded) entries come back as saved
    if extra_sharded:
        sharded.update(extra_sharded)
    if weights_only:
        sharded.pop("run_state", None)
    loaded = dist_checkpointing.load(sharded, str(ckpt_dir))
    for i, c in enumerate(chunks):
        _load_model_state(unwrap(c), loaded["model" if len(chunks) == 1 else f"model{i}"], ckpt_dir)
    out: dict[str, Any] = {"step": 0, "state": {}}
    for k in extra_sharded or {}:
        out[k] = loaded[k]
    if weights_only:
        return out
    if optimizer is not None:
        if "optimizer" not in loaded:
            raise CheckpointError(f"{ckpt_dir}: no optimizer state (saved with save_optimizer=false)")
        steps = _torch_adam_steps_restored(optimizer) if fmt != PLAIN_OPTIMIZER else contextlib.nullcontext()
        with torch.no_grad(), steps:  # no_grad: the distributed optimizer copies into views of params
            optimizer.load_state_dict(loaded["optimizer"])
    run_state = loaded.get("run_state") or {}
    if scheduler is not None and run_state.get("scheduler") is not None:
        scheduler.num_steps = 0  # Megatron's load_state_dict *adds* the saved step count
        scheduler.load_state_dict(run_state["scheduler"])
    out["step"] = int(run_state.get("step", meta["step"]))
    out["state"] = run_state.get("state", {})
    _restore_rng(Path(ckpt_dir))
    return out


def _load_model_state(model: torch.nn.Module, state: dict, ckpt_dir) -> None:
    state = {k.removeprefix(MODEL_PREFIX): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_dir}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")


def _restore_rng(ckpt_dir: Path) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    f = ckpt_dir / "rng" / f"rank_{rank:05d}.pt"
    if not f.is_file():
        return
    rng = torch.load(f, weights_only=False)
    if rng["world_size"] != world:
        return  # a different layout: per-rank streams do not map; keep the fresh seeds
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
