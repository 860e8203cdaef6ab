"""The pure packages (rl, reward, convert) import with megatron and vllm made unimportable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: in the test process other tests may already have imported megatron.
SCRIPT = """
import importlib, pkgutil, sys
sys.modules["megatron"] = None  # any "import megatron..." now raises ImportError
sys.modules["vllm"] = None
names = []
for pkg_name in ("megatron_t1.rl", "megatron_t1.reward", "megatron_t1.convert"):
    pkg = importlib.import_module(pkg_name)
    names.append(pkg_name)
    for info in pkgutil.walk_packages(pkg.__path__, pkg_name + "."):
        importlib.import_module(info.name)
        names.append(info.name)
import megatron_t1.rl as rl
for name in rl.__all__:  # the lazy re-exports resolve too
    getattr(rl, name)
leaked = [m for m in sys.modules if m.split(".")[0] in ("megatron", "vllm") and sys.modules[m] is not None]
assert not leaked, leaked
print("imported", len(names), "modules:", " ".join(names))
"""


def test_pure_packages_import_without_megatron_or_vllm():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "megatron_t1.rl.objective" in proc.stdout and "megatron_t1.reward" in proc.stdout
    assert "megatron_t1.convert" in proc.stdout
