"""Import boundaries of the rollout package: only ``rollout/vllm_engine.py`` imports vLLM, and the
contract, the weight sync and the vLLM module itself import without vLLM, Megatron or transformers
(those are imported where they are used)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import megatron_t1

ROOT = Path(megatron_t1.__file__).parent


def test_only_the_vllm_engine_imports_vllm():
    pattern = re.compile(r"^\s*(import vllm|from vllm[ .])", re.M)
    users = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if pattern.search(p.read_text()))
    assert users == ["rollout/vllm_engine.py"]


def test_rollout_modules_import_without_heavy_dependencies():
    code = (
        "import sys\n"
        "for m in ('vllm', 'megatron', 'transformers'):\n"
        "    sys.modules[m] = None\n"
        "import megatron_t1.rollout, megatron_t1.rollout.weight_sync, megatron_t1.rollout.vllm_engine\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
