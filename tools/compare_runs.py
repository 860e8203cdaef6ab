#!/usr/bin/env python
"""Do two runs have the same numbers? Compares their ``metrics.jsonl`` (and eval outputs), ignoring timing.

``python tools/compare_runs.py RUN_A RUN_B [--tol 0]``

RUN_A / RUN_B: run folders holding ``metrics.jsonl`` (``runs/NAME``), or demo folders (``runs/demo``:
its ``sft/`` and ``rl/`` runs and ``eval/`` outputs are compared). Every record must have the same
keys in the same order and, except for wall-clock keys (``*_s``, ``*seconds``, ``*_per_s``, each also
with ``_max`` / ``_min`` / ``_mean``), the same values (``--tol``: an absolute tolerance; 0, the
default, asks for equality). The eval CSV and jsonl files must be byte-identical. Use it to show that
a refactor changed no number: run the same command on the old and the new code, then compare. Exit
status 0 when equal, 1 otherwise (each difference printed), 2 on a missing folder.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

TIMING = re.compile(r"(_s|seconds|_per_s)(_max|_min|_mean)?$")
EVAL_FILES = ("results.csv", "responses.jsonl", "scaling.csv", "scaling_responses.jsonl")


def is_timing(key: str) -> bool:
    """Wall-clock keys, which differ between any two runs."""
    return TIMING.search(key) is not None


def _equal(a, b, tol: float) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return True
        return a == b or abs(a - b) <= tol
    return a == b


def compare_metrics(a: Path, b: Path, *, tol: float = 0.0) -> list[str]:
    """Differences between two ``metrics.jsonl`` files, one line each (empty: the same numbers)."""
    ra = [json.loads(line) for line in a.read_text().splitlines() if line.strip()]
    rb = [json.loads(line) for line in b.read_text().splitlines() if line.strip()]
    out = []
    if len(ra) != len(rb):
        out.append(f"{a} has {len(ra)} records, {b} has {len(rb)}")
    for i, (x, y) in enumerate(zip(ra, rb), start=1):
        where = f"{a.parent.name} record {i} (step {x.get('step')})"
        if list(x) != list(y):
            out.append(f"{where}: keys differ: {sorted(set(x) ^ set(y)) or 'same keys, other order'}")
            continue
        out += [
            f"{where}: {k} {x[k]!r} != {y[k]!r}"
            for k in x
            if not is_timing(k) and not _equal(x[k], y[k], tol)
        ]
    return out


def compare_runs(a: Path, b: Path, *, tol: float = 0.0) -> tuple[list[str], list[str]]:
    """(what was compared, the differences) for two run or demo folders."""
    compared, diffs = [], []
    subdirs = [p.name for p in sorted(a.iterdir()) if (p / "metrics.jsonl").is_file()] if a.is_dir() else []
    runs = (
        [("", a / "metrics.jsonl")]
        if (a / "metrics.jsonl").is_file()
        else [(s, a / s / "metrics.jsonl") for s in subdirs]
    )
    for name, ma in runs:
        mb = b / name / "metrics.jsonl" if name else b / "metrics.jsonl"
        if not mb.is_file():
            diffs.append(f"{mb}: missing")
            continue
        compared.append(str(Path(name or ".") / "metrics.jsonl"))
        diffs += compare_metrics(ma, mb, tol=tol)
    for f in EVAL_FILES:
        fa, fb = a / "eval" / f, b / "eval" / f
        if fa.is_file() or fb.is_file():
            compared.append(f"eval/{f}")
            if not (fa.is_file() and fb.is_file()) or fa.read_bytes() != fb.read_bytes():
                diffs.append(f"eval/{f}: differs (or is missing on one side)")
    if not compared:
        diffs.append(f"{a}: no metrics.jsonl or eval/ outputs to compare")
    return compared, diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--tol", type=float, default=0.0, help="absolute tolerance on values (default 0)")
    args = parser.parse_args(argv)
    for p in (args.run_a, args.run_b):
        if not p.is_dir():
            print(f"compare_runs: {p}: no such folder", file=sys.stderr)
            return 2
    compared, diffs = compare_runs(args.run_a, args.run_b, tol=args.tol)
    for d in diffs:
        print(d)
    print(f"compared {', '.join(compared) or 'nothing'}: {len(diffs)} difference(s)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
