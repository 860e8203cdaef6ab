"""How many logits one chunk of the log-prob / entropy kernels holds: pure arithmetic, no torch.

Shared by the kernels (:mod:`megatron_t1.rl.logprobs` over logits, :mod:`megatron_t1.rl.fused` from
hidden states) and the memory planner (:mod:`megatron_t1.plan.formulas`, no torch), so that the
plan counts the chunks the kernels allocate. ``device_type`` is a torch device's ``type`` ("cpu",
"cuda", ...): every type but "cpu" gets the GPU budget.
"""

from __future__ import annotations

import math

CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}
"""Logits per chunk when ``chunk_size`` is None. On CPU, 1M fp32 values (4 MiB) per scratch buffer keeps
a chunk in cache (measured fastest, 2-core EPYC) and the extra memory at a few chunks; on GPU bigger
chunks amortise kernel launches."""


def _budget(device_type: str) -> int:
    return CHUNK_ELEMENTS["cpu" if device_type == "cpu" else "cuda"]


def chunk_rows(row_elements: int, device_type: str, chunk_size: int | None = None) -> int:
    """Rows (tokens) per chunk of the logits path: ``chunk_size`` if given, else about 1M (CPU) or 16M
    (GPU) elements of ``row_elements`` columns."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, _budget(device_type) // max(1, row_elements))


def tile_shape(
    n_rows: int,
    v_valid: int,
    device_type: str,
    chunk_size: int | None,
    vocab_chunk_size: int | None = None,
) -> tuple[int, int]:
    """(rows, columns) of a fused output layer's logits tile: about 0.5M (CPU) / 16M (GPU) elements, or
    as given.

    Without ``chunk_size`` the tile is roughly square (rows ~ columns ~ sqrt(budget)), which balances the
    traffic on the weight gradient (read once per row block) against that on the hidden gradient (once per
    column block).
    """
    # Half the chunked path's CPU budget: the fused tile has two scratch tiles beside the GEMM's own
    # packing buffers, and matmuls of 512 x 1024 tiles run as fast as bigger ones (one thread, EPYC).
    budget = _budget(device_type) // (2 if device_type == "cpu" else 1)
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        rows = chunk_size
    else:
        rows = 1 << (int(math.log2(budget)) // 2)  # 512 on CPU, 4096 on GPU
    rows = max(1, min(rows, n_rows))
    if vocab_chunk_size is not None and vocab_chunk_size < 1:
        raise ValueError(f"vocab_chunk_size must be >= 1, got {vocab_chunk_size}")
    cols = budget // rows if vocab_chunk_size is None else vocab_chunk_size
    return rows, max(1, min(v_valid, cols))
