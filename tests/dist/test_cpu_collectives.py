"""CPU patch 11 (megatron_t1/mcore/cpu.py) on 2 real gloo ranks: Megatron's sequence-parallel gather
with uneven parts per rank (the alltoall dispatcher at TP > 1 with EP > 1), forward and backward,
against the same computation written plainly in float64."""

from __future__ import annotations

import pytest

from tests.dist.harness import run_ranks

pytestmark = pytest.mark.dist

SIZES = [3, 5]  # rows of rank 0 and rank 1


def _worker(rank, world):
    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    from megatron_t1.mcore.cpu import enable_cpu_mode

    enable_cpu_mode()
    dist.init_process_group("gloo")
    try:
        inputs = [torch.randn(n, 4, generator=torch.Generator().manual_seed(10 + r)) for r, n in enumerate(SIZES)]
        grads = [torch.randn(sum(SIZES), 4, generator=torch.Generator().manual_seed(20 + r)) for r in range(world)]
        x = inputs[rank].clone().requires_grad_(True)
        out = gather_from_sequence_parallel_region(x, group=dist.group.WORLD, output_split_sizes=SIZES)
        out.backward(grads[rank])
        want_out = torch.cat([t.double() for t in inputs])
        start = sum(SIZES[:rank])
        want_grad = sum(g.double() for g in grads)[start : start + SIZES[rank]]
        return (
            tuple(out.shape),
            (out.double() - want_out).abs().max().item(),
            tuple(x.grad.shape),
            (x.grad.double() - want_grad).abs().max().item(),
        )
    finally:
        dist.destroy_process_group()


def test_uneven_sequence_parallel_gather_and_its_backward():
    for rank, (shape, err, gshape, gerr) in enumerate(run_ranks(_worker, 2, timeout=120)):
        assert shape == (sum(SIZES), 4) and err == 0.0
        assert gshape == (SIZES[rank], 4) and gerr < 1e-6
