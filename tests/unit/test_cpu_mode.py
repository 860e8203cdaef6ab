"""megatron_t1.mcore.cpu: the CPU patches, and hiding a GPU for ``run.device: cpu`` on a GPU box.

Each case runs in a fresh interpreter: the patches are process-wide and permanent by design.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


def test_force_hides_a_visible_gpu_and_megatron_rope_stays_on_cpu():
    # Pretend CUDA exists (as on a GPU box): without force nothing is patched; with force the process
    # sees no GPU and Megatron's RoPE (which moves its frequencies to torch.cuda.current_device() at
    # the first forward) computes on the CPU.
    out = _run(
        """
        import torch
        torch.cuda.is_available = lambda: True
        from megatron_t1.mcore.cpu import enable_cpu_mode
        first = enable_cpu_mode()
        second = enable_cpu_mode(force=True)
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
        rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)
        emb = rope(16)
        x = torch.zeros(2, device="cuda")
        print(first, second, torch.cuda.is_available(), emb.device.type, tuple(emb.shape), x.device.type)
        """
    )
    assert out == "False True False cpu (16, 1, 1, 8) cpu"


def test_init_parallel_on_cpu_forces_cpu_mode():
    out = _run(
        """
        import torch
        torch.cuda.is_available = lambda: True  # a GPU box
        from megatron_t1.config import ParallelConfig
        from megatron_t1.mcore.parallel import destroy_parallel, init_parallel
        ctx = init_parallel(ParallelConfig(), seed=1, device="cpu")
        print(ctx.device.type, torch.cuda.is_available())
        destroy_parallel()
        """
    )
    assert out == "cpu False"
