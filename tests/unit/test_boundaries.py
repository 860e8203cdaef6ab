"""Hard import boundaries (docs: STYLE.md point 1), checked two ways.

* Statically, over every module of the package and of ``tools/`` and ``bench/``: each file is
  parsed with :mod:`ast` and every import is collected (``import`` / ``from ... import`` at any
  depth, inside functions too, relative ones resolved, and ``importlib.import_module`` /
  ``__import__`` calls with a literal name). Only ``megatron_t1/mcore/`` may import ``megatron``;
  only ``megatron_t1/rollout/vllm_engine.py`` may import ``vllm``.
* At run time, in a fresh interpreter with ``megatron`` and ``vllm`` made unimportable: every
  module of the pure packages (RL math, rewards, converters, data, config) imports, and the lazy
  re-exports of ``megatron_t1.rl`` resolve.

The checker itself is tested on a scratch tree that breaks each rule.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Top-level name -> the files (relative to the repo root; a trailing "/" is a folder) allowed to import it.
RULES = {
    "megatron": ("megatron_t1/mcore/",),
    "vllm": ("megatron_t1/rollout/vllm_engine.py",),
}
CHECKED = ("megatron_t1/**/*.py", "tools/*.py", "bench/*.py")

# Imported, module by module, with megatron and vllm unimportable.
PURE_PACKAGES = ("megatron_t1.rl", "megatron_t1.reward", "megatron_t1.convert", "megatron_t1.data")
PURE_MODULES = ("megatron_t1.config", "megatron_t1.atomic")


def module_name(rel: Path) -> str:
    """Dotted module name of a file (relative to the repo root); ``pkg/__init__.py`` -> ``pkg``."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str | None, level: int, module: str, is_package: bool) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, name] if name else base)


def _literal(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def imported_modules(source: str, module: str, *, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``source`` (the text of ``module``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, _resolve(node.module, node.level, module, is_package)))
        elif isinstance(node, ast.Call):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if fname not in ("import_module", "__import__") or not node.args:
                continue
            target = _literal(node.args[0])
            if target is None:  # a computed name: only the run-time test below can see it
                continue
            if fname == "import_module" and target.startswith("."):  # import_module(".x", package)
                package = _literal(node.args[1]) if len(node.args) > 1 else None
                package = package or next(
                    (_literal(k.value) for k in node.keywords if k.arg == "package"), None
                )
                level = len(target) - len(target.lstrip("."))
                target = _resolve(target[level:] or None, level, package or module, package is not None)
            found.append((node.lineno, target))
    return found


def boundary_violations(root: Path, patterns=CHECKED, rules=RULES) -> list[str]:
    """``file:line: import <name>`` for every import under ``root`` that breaks ``rules``."""
    out = []
    files = sorted({p for pattern in patterns for p in root.glob(pattern) if "__pycache__" not in p.parts})
    for path in files:
        rel = path.relative_to(root)
        posix = rel.as_posix()
        imports = imported_modules(path.read_text(), module_name(rel), is_package=path.name == "__init__.py")
        for line, name in imports:
            allowed = rules.get(name.split(".")[0])
            if allowed is not None and not any(
                posix == a or (a.endswith("/") and posix.startswith(a)) for a in allowed
            ):
                out.append(f"{posix}:{line}: import {name} (allowed only in {', '.join(allowed)})")
    return out


def test_only_mcore_imports_megatron_and_only_the_vllm_engine_imports_vllm():
    bad = boundary_violations(ROOT)
    assert not bad, "import boundary broken (STYLE.md point 1):\n" + "\n".join(bad)


def test_the_checker_sees_the_files_it_should():
    """Guards against a glob that silently matches nothing (and so passes)."""
    seen = {module_name(p.relative_to(ROOT)) for pattern in CHECKED for p in ROOT.glob(pattern)}
    for name in (
        "megatron_t1.rollout.weight_sync",
        "megatron_t1.mcore.export",
        "megatron_t1.rl",
        "tools.convert_ckpt",
    ):
        assert name in seen, name
    src = (ROOT / "megatron_t1/rollout/vllm_engine.py").read_text()
    assert any(n.split(".")[0] == "vllm" for _, n in imported_modules(src, "megatron_t1.rollout.vllm_engine"))


def test_checker_finds_every_kind_of_violation(tmp_path):
    """A scratch tree with one violation of each kind: every one is reported with its file:line."""
    files = {
        "megatron_t1/mcore/model.py": "import megatron.core\nfrom megatron.core import parallel_state\n",
        "megatron_t1/rollout/vllm_engine.py": "def f():\n    import vllm\n",
        "megatron_t1/rollout/weight_sync.py": """\
            import torch

            def policy_logprobs():
                from megatron.core import parallel_state as ps
                return ps
            """,
        "megatron_t1/rl/loss.py": """\
            import importlib

            class A:
                def m(self):
                    try:
                        import vllm.sampling_params
                    except ImportError:
                        pass
                    return importlib.import_module("megatron.core.tensor_parallel")
            """,
        "megatron_t1/reward/__init__.py": "from importlib import import_module\nx = import_module('vllm')\n",
        "megatron_t1/data/io.py": "m = __import__('megatron')\nn = __import__(name)\nfrom . import sft\n",
        "megatron_t1/convert/maps.py": "import os, megatron\n",
        "tools/tool.py": "if True:\n    from megatron import core\n",
        "bench/b.py": "from megatron_t1.mcore import model\nimport megatron_t1\n",  # allowed
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    assert boundary_violations(tmp_path) == [
        "megatron_t1/convert/maps.py:1: import megatron (allowed only in megatron_t1/mcore/)",
        "megatron_t1/data/io.py:1: import megatron (allowed only in megatron_t1/mcore/)",
        "megatron_t1/reward/__init__.py:2: import vllm (allowed only in megatron_t1/rollout/vllm_engine.py)",
        "megatron_t1/rl/loss.py:6: import vllm.sampling_params "
        "(allowed only in megatron_t1/rollout/vllm_engine.py)",
        "megatron_t1/rl/loss.py:9: import megatron.core.tensor_parallel (allowed only in megatron_t1/mcore/)",
        "megatron_t1/rollout/weight_sync.py:4: import megatron.core (allowed only in megatron_t1/mcore/)",
        "tools/tool.py:2: import megatron (allowed only in megatron_t1/mcore/)",
    ]


@pytest.mark.parametrize(
    ("source", "module", "is_package", "expected"),
    [
        ("from . import sft", "megatron_t1.data.io", False, "megatron_t1.data"),
        ("from .sft import x", "megatron_t1.data", True, "megatron_t1.data.sft"),
        (
            "from ..mcore.export import f",
            "megatron_t1.rollout.weight_sync",
            False,
            "megatron_t1.mcore.export",
        ),
        ("from .. import mcore", "megatron_t1.rollout", True, "megatron_t1"),
        (
            "import importlib\nimportlib.import_module('.kl', 'megatron_t1.rl')",
            "x",
            False,
            "megatron_t1.rl.kl",
        ),
        (
            "import importlib\nimportlib.import_module('..mcore', package='megatron_t1.rl')",
            "x",
            False,
            "megatron_t1.mcore",
        ),
    ],
)
def test_relative_imports_are_resolved(source, module, is_package, expected):
    assert imported_modules(source, module, is_package=is_package)[-1][1] == expected


# Runs in a fresh interpreter: in the test process other tests may already have imported megatron.
SCRIPT = """
import importlib, pkgutil, sys
sys.modules["megatron"] = None  # any "import megatron..." now raises ImportError
sys.modules["vllm"] = None
packages, modules = sys.argv[1].split(","), sys.argv[2].split(",")
names = []
for pkg_name in packages:
    pkg = importlib.import_module(pkg_name)
    names.append(pkg_name)
    for info in pkgutil.walk_packages(pkg.__path__, pkg_name + "."):
        importlib.import_module(info.name)
        names.append(info.name)
for name in modules:
    importlib.import_module(name)
    names.append(name)
import megatron_t1.rl as rl
for name in rl.__all__:  # the lazy re-exports resolve too
    getattr(rl, name)
leaked = [m for m in sys.modules if m.split(".")[0] in ("megatron", "vllm") and sys.modules[m] is not None]
assert not leaked, leaked
print(" ".join(names))
"""


def test_pure_packages_import_without_megatron_or_vllm():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, ",".join(PURE_PACKAGES), ",".join(PURE_MODULES)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = set(proc.stdout.split())
    # every module file of the pure packages was imported (walk_packages found them all)
    for pkg in PURE_PACKAGES:
        folder = ROOT / pkg.replace(".", "/")
        for path in folder.rglob("*.py"):
            if "__pycache__" not in path.parts:
                assert module_name(path.relative_to(ROOT)) in imported, path
    assert set(PURE_MODULES) <= imported


def test_the_run_time_check_can_fail(tmp_path):
    """The same script fails for a package that imports megatron at run time (a scratch one)."""
    pkg = tmp_path / "leaky"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "inner.py").write_text("def f():\n    from megatron.core import parallel_state\n")
    (pkg / "outer.py").write_text("from megatron.core import parallel_state\n")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, "leaky", "megatron_t1.config"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    assert "leaky/outer.py" in proc.stderr and "No module named 'megatron.core'" in proc.stderr
