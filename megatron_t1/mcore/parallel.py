"""torch.distributed and Megatron model-parallel groups from a :class:`ParallelConfig`.

Launch with torchrun (it sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT) or call
:func:`init_parallel` from a process that already ran ``init_process_group`` (tests).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megatron_t1.config import ConfigError, ParallelConfig
from megatron_t1.mcore.cpu import enable_cpu_mode


@dataclass(frozen=True)
class ParallelContext:
    """Where this rank sits. Groups are read from Megatron's parallel_state by the callers that
    need them; the sizes and ranks here are what the training loop and logging use."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    vpp: int | None
    device: torch.device
    local_world_size: int = 1
    """Ranks on this rank's node (torchrun's LOCAL_WORLD_SIZE; without it, the whole world is one
    node). The rollout engines tile each node (:mod:`megatron_t1.rollout.placement`)."""

    @property
    def is_logging_rank(self) -> bool:
        """The last pipeline stage's first TP/DP rank: it holds the loss."""
        return self.tp_rank == 0 and self.dp_rank == 0 and self.pp_rank == self.pp - 1

    @property
    def is_first_pp_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def init_parallel(pcfg: ParallelConfig, *, seed: int, device: str = "auto") -> ParallelContext:
    """Initialise torch.distributed (if needed), the CPU patches (without CUDA), Megatron's TP/PP/DP
    groups and its model-parallel RNG. Single-process runs need no launcher: world size 1."""
    use_cuda = torch.cuda.is_available() and device != "cpu"
    # Read by Megatron's TP layers (async grad all-reduce ordering on GPU); the one place we set a
    # third-party environment variable. A user's own value wins.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device is cuda but torch sees no GPU")
    if not use_cuda:
        enable_cpu_mode(force=device == "cpu")  # run.device cpu on a GPU box hides the GPU (mcore/cpu.py)
    backend = pcfg.backend if pcfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=pcfg.timeout_minutes)
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:  # torchrun / srun / a test harness: its rendezvous variables
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            # A plain `python -m megatron_t1 ...`: a world of one on an in-memory store. No rendezvous
            # variables are set, so none leak into a later init or a subprocess (torchrun, a CLI run).
            dist.init_process_group(
                backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    world = dist.get_world_size()
    dp = pcfg.data_parallel_size(world)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=pcfg.tp,
        pipeline_model_parallel_size=pcfg.pp,
        expert_model_parallel_size=pcfg.ep,
        virtual_pipeline_model_parallel_size=pcfg.virtual_pipeline_model_parallel_size,
        distributed_timeout_minutes=int(max(1, pcfg.timeout_minutes)),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelContext(
        rank=dist.get_rank(),
        world_size=world,
        tp=pcfg.tp,
        pp=pcfg.pp,
        dp=dp,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        vpp=pcfg.virtual_pipeline_model_parallel_size,
        device=torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
    )


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group (tests, end of a run)."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
