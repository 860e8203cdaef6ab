"""The rollout contract, the weight sync and the vLLM module itself import without vLLM, Megatron or
transformers (those are imported where they are used). Which files may import vLLM or Megatron at
all is checked in ``test_boundaries.py``."""

from __future__ import annotations

import subprocess
import sys


def test_rollout_modules_import_without_heavy_dependencies():
    code = (
        "import sys\n"
        "for m in ('vllm', 'megatron', 'transformers'):\n"
        "    sys.modules[m] = None\n"
        "import megatron_t1.rollout, megatron_t1.rollout.weight_sync, megatron_t1.rollout.vllm_engine\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
