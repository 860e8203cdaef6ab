"""Make Megatron-Core run on a CPU-only torch (gloo), for tests, the demo and laptops.

Megatron-Core assumes CUDA throughout. On a torch built without CUDA every ``torch.cuda.*`` entry
point below asserts "Torch not compiled with CUDA enabled". :func:`enable_cpu_mode` patches exactly
these points, once per process, when ``torch.cuda.is_available()`` is False. On a GPU machine it does
nothing, unless asked to (``force=True``, for ``run.device: cpu`` there): Megatron puts tensors on
the GPU whenever CUDA exists (RoPE moves its frequencies to ``torch.cuda.current_device()`` at the
first forward, the schedules allocate on "cuda"), so a CPU run on a GPU box must hide the GPU from
the whole process: the same patches, plus ``torch.cuda.is_available`` -> False, after which the
process cannot use its GPU any more. This module is the single, contained exception to "no global
mutable state" (see STYLE.md, point 7).

Patch points and why:

1. ``torch.cuda.current_device`` -> 0. Megatron passes it as ``device=`` in ~170 places (attention
   buffers, linear layers, RoPE, schedules); the torch-function mode (6) then maps device 0 to CPU.
2. ``torch.cuda.synchronize``, ``torch.cuda.empty_cache`` -> no-ops (timers, checkpointing).
3. ``torch.cuda.get_rng_state`` / ``set_rng_state`` / ``manual_seed`` / ``manual_seed_all`` -> the
   CPU generator. ``model_parallel_cuda_manual_seed`` must still run because attention forks the RNG
   tracker; with these, each tracker state is a CPU generator state.
4. ``megatron.core.tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` -> the CPU
   generator (they index ``torch.cuda.default_generators`` directly).
5. ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` / ``memory_reserved`` -> 0, and
   ``torch.cuda.nvtx.range_push`` / ``range_pop`` -> no-ops (logging and profiling hooks).
6. A ``TorchFunctionMode`` pushed once for the process that rewrites CUDA devices to CPU in every
   torch call: ``device="cuda"`` / ``device=0`` / ``torch.device("cuda")`` keyword or ``Tensor.to``
   argument, ``Tensor.cuda()`` becomes a no-op, and the zero-argument ``Tensor.type()`` reports
   ``torch.cuda.*Tensor`` (the optimizer and DDP check parameter types against those strings). Used by
   the pipeline schedule (``torch.zeros(..., device="cuda")``), the optimizer
   (``torch.tensor([1.0], device="cuda")``), DDP buffers and tied embeddings under PP
   (``weight.data.cuda()``). Its overhead was not measurable on a 3.7M-parameter model.
7. ``torch.cuda.Stream`` / ``current_stream`` / ``Event`` -> inert stand-ins (DDP and the optimizer
   create and wait on streams and events; on CPU every op is already synchronous).
8. The ``backward`` of every autograd function in ``megatron.core.tensor_parallel`` (mappings,
   layers, cross entropy, random) runs with a fresh instance of the mode (6) pushed. A mode is off
   while its own handler runs, and the whole of ``torch.autograd.backward`` runs inside one handler
   call, so without this the Python backward code there is not rewritten: sequence parallelism's
   reduce-scatter and all-gather allocate on ``torch.cuda.current_device()`` in backward.
9. ``megatron.core.transformer.moe.moe_utils.te_general_gemm`` -> None when TransformerEngine is not
   importable. megatron-core 0.16.1 imports it only inside ``try: import transformer_engine`` but
   tests ``te_general_gemm is not None`` in the MoE router's gating linear, a ``NameError`` on any
   install without TE (the torch ``mm`` path it then takes is the intended fallback). Not a CUDA
   entry point: :func:`fill_moe_te_gap` is also called by ``mcore.model.layer_spec`` for an MoE
   model without TE on a GPU.
10. ``megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu``: ``as_numpy=True``
    also for a tensor already on the CPU. The alltoall dispatcher computes its EP split sizes as
    tensors and relies on this device-to-host copy to turn them into numpy arrays, which
    ``all_to_all_single`` takes as split sizes; a CPU tensor was passed on unchanged, a ``TypeError``
    under expert parallelism.
11. ``megatron.core.tensor_parallel.mappings._gather_along_first_dim`` /
    ``_reduce_scatter_along_first_dim`` with split sizes (uneven parts per rank): gloo's
    ``all_gather`` and ``reduce_scatter`` need equal parts (NCCL's take uneven ones). The alltoall
    dispatcher uses them over TP when experts are split over EP *and* TP > 1 (the tokens each TP rank
    routes to this EP rank's experts differ in number). On CPU the parts are padded to the largest,
    gathered and trimmed; the reduce-scatter is an all-reduce of the whole tensor, of which each rank
    keeps its part (same sums; the cost does not matter at CPU scale).

Limits: TransformerEngine layers need CUDA; use the local layer spec (its norms allow sequence
parallelism: ``megatron_t1.mcore.model.TorchNorm``), ``use_cpu_initialization=True`` and fp32.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_state = {"enabled": False}  # the one piece of process state this module owns (see docstring)


def _to_cpu_device(dev):
    if isinstance(dev, torch.device):
        return torch.device("cpu") if dev.type == "cuda" else dev
    if isinstance(dev, int) and not isinstance(dev, bool):
        return torch.device("cpu")
    if isinstance(dev, str) and dev.startswith("cuda"):
        return "cpu"
    return dev


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrite CUDA devices to CPU in every torch call (patch point 6)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if name.startswith("torch.") else name
        return func(*args, **kwargs)


_MEGATRON_AUTOGRAD_MODULES = (
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.tensor_parallel.random",
)


def _backward_under_mode(backward):
    def run(*args, **kwargs):
        with _CudaToCpuMode():
            return backward(*args, **kwargs)

    run.__wrapped__ = backward
    return run


def _patch_megatron_backwards() -> None:
    """Patch point 8: the Python backward of Megatron's tensor-parallel autograd functions runs with
    the device rewriting pushed (module docstring)."""
    import importlib
    import inspect

    for name in _MEGATRON_AUTOGRAD_MODULES:
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(cls, torch.autograd.Function)
                and cls.__module__ == name
                and "backward" in vars(cls)
            ):
                cls.backward = staticmethod(_backward_under_mode(cls.backward))


class _NullStream:
    """Inert stand-in for torch.cuda.Stream / Event on CPU (patch point 7)."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _NullStream()

    def record(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0

    def wait(self, *a, **k):
        pass


def _cpu_get_rng_state(*args, **kwargs):
    return torch.get_rng_state()


def _cpu_set_rng_state(state, *args, **kwargs):
    torch.set_rng_state(state)


def _noop(*args, **kwargs):
    return None


def fill_moe_te_gap() -> None:
    """Patch 9 of the module docstring (idempotent; nothing to do when TE was imported)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _move_to_cpu_as_numpy_too(tensor, as_numpy: bool = False, record_stream: bool = False):
    if torch.is_tensor(tensor) and not tensor.is_cuda:
        return tensor.numpy() if as_numpy else tensor
    return _state["move_to_cpu"](tensor, as_numpy=as_numpy, record_stream=record_stream)


def _gather_uneven_too(input_, group, output_split_sizes=None, use_global_buffer=False):
    """Patch 11: the uneven gather as padded equal parts."""
    if output_split_sizes is None or group.size() == 1:
        return _state["gather"](input_, group, output_split_sizes, use_global_buffer)
    import torch.distributed as dist

    sizes = [int(n) for n in output_split_sizes]
    longest = max(sizes)
    padded = input_.new_zeros((longest, *input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def _reduce_scatter_uneven_too(input_, group, input_split_sizes=None, use_global_buffer=False):
    """Patch 11: the uneven reduce-scatter as an all-reduce, each rank keeping its part."""
    if input_split_sizes is None or group.size() == 1:
        return _state["reduce_scatter"](input_, group, input_split_sizes, use_global_buffer)
    import torch.distributed as dist

    total = input_.contiguous().clone()
    dist.all_reduce(total, group=group)
    start = sum(int(n) for n in input_split_sizes[: group.rank()])
    return total[start : start + int(input_split_sizes[group.rank()])].clone()


def enable_cpu_mode(force: bool = False) -> bool:
    """Apply every patch listed in the module docstring; returns True when CPU mode is active.

    Idempotent. Without ``force`` a no-op returning False when CUDA is available; with it, the GPU is
    hidden from this process for good (``torch.cuda.is_available()`` is False from then on).
    """
    if torch.cuda.is_available() and not force:
        return False
    with _lock:
        if _state["enabled"]:
            return True
        cuda = torch.cuda
        cuda.is_available = lambda: False  # a no-op without CUDA; with force, the rest follows it
        cuda.current_device = lambda: 0
        cuda.synchronize = _noop
        cuda.empty_cache = _noop
        cuda.get_rng_state = _cpu_get_rng_state
        cuda.set_rng_state = _cpu_set_rng_state
        # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
        cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed)) and None
        cuda.manual_seed_all = cuda.manual_seed
        cuda.memory_allocated = lambda *a, **k: 0
        cuda.max_memory_allocated = lambda *a, **k: 0
        cuda.memory_reserved = lambda *a, **k: 0
        cuda.Stream = _NullStream
        cuda.Event = _NullStream
        cuda.current_stream = lambda *a, **k: _NullStream()
        cuda.default_stream = lambda *a, **k: _NullStream()
        cuda.stream = lambda *a, **k: contextlib.nullcontext()
        cuda.nvtx.range_push = _noop
        cuda.nvtx.range_pop = _noop

        from megatron.core.tensor_parallel import random as mrandom

        mrandom._get_cuda_rng_state = _cpu_get_rng_state
        mrandom._set_cuda_rng_state = _cpu_set_rng_state

        fill_moe_te_gap()
        from megatron.core.transformer.moe import token_dispatcher

        _state["move_to_cpu"] = token_dispatcher.maybe_move_tensor_to_cpu
        token_dispatcher.maybe_move_tensor_to_cpu = _move_to_cpu_as_numpy_too
        from megatron.core.tensor_parallel import mappings

        _state["gather"] = mappings._gather_along_first_dim
        _state["reduce_scatter"] = mappings._reduce_scatter_along_first_dim
        mappings._gather_along_first_dim = _gather_uneven_too
        mappings._reduce_scatter_along_first_dim = _reduce_scatter_uneven_too
        _patch_megatron_backwards()
        _CudaToCpuMode().__enter__()  # stays pushed for the life of the process
        _state["enabled"] = True
    return True


def default_device() -> torch.device:
    """The device tensors of the policy live on: the current CUDA device, or CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
