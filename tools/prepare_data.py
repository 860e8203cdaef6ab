#!/usr/bin/env python
"""Normalise MATH-train, NuminaMath, the released T1 SFT set and the benchmarks into our jsonl layouts;
deduplicate; decontaminate the training prompts against the benchmarks (n-gram overlap).

    python tools/prepare_data.py --out data/prepared --benchmark-dir data/raw/benchmarks \\
        --benchmarks math500,aime2024,omni_math500,gpqa \\
        --math-train data/raw/MATH/train --numina data/raw/NuminaMath-CoT --t1-sft data/raw/T1/train.jsonl

Nothing is downloaded: every input is a local file or folder (jsonl / parquet / json / csv). Writes,
each atomically, into ``--out``:

* ``benchmarks/<name>.jsonl``: ``{"id", "question", "answer", "subject", "level", "source"}``
  (GPQA with its options in a fixed order and a letter answer), readable by ``eval --data-dir``;
* ``train_prompts.jsonl``: MATH-train + NuminaMath problems (same layout; RL prompts);
* ``t1_sft.jsonl``: ``{"messages": [...], "answer"}`` (the SFT layout);
* ``removed.jsonl``: every dropped record with ``duplicate_of`` or ``contaminated_by`` + ``overlap``;
* ``report.json``: counts per source (read, no answer, duplicates, contaminated per benchmark, kept).

The logic lives in :mod:`megatron_t1.eval.prepare` and :mod:`megatron_t1.eval.loaders`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--benchmarks",
        default="math500,aime2024,omni_math500,gpqa",
        help="benchmark names (found under --benchmark-dir) or NAME=PATH, comma-separated",
    )
    p.add_argument("--benchmark-dir", default=None, help="folder with the raw benchmark files")
    p.add_argument(
        "--math-train", default=None, help="MATH train folder (one json per problem) or jsonl/parquet"
    )
    p.add_argument("--numina", default=None, help="NuminaMath jsonl/parquet file or folder")
    p.add_argument("--t1-sft", default=None, help="T1 SFT set (messages / conversations / prompt-response)")
    p.add_argument("--ngram", type=int, default=13, help="decontamination window in word tokens (default 13)")
    p.add_argument(
        "--min-tokens",
        type=int,
        default=6,
        help="benchmark questions shorter than --ngram are matched whole from this length (default 6)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_t1.atomic import write_text_atomic
    from megatron_t1.data.io import DataError, write_jsonl_atomic
    from megatron_t1.eval.loaders import load_benchmark
    from megatron_t1.eval.prepare import (
        Decontaminator,
        SourceReport,
        dedupe,
        math_train_records,
        numina_records,
        problem_record,
        t1_sft_records,
    )

    out = Path(args.out)
    (out / "benchmarks").mkdir(parents=True, exist_ok=True)
    report: dict = {"ngram": args.ngram, "min_tokens": args.min_tokens, "benchmarks": {}, "sources": {}}
    removed: list[dict] = []
    try:
        bench_records = []
        for spec in [s.strip() for s in args.benchmarks.split(",") if s.strip()]:
            name, problems = load_benchmark(spec, args.benchmark_dir)
            recs = [problem_record(p, name) for p in problems]
            write_jsonl_atomic(out / "benchmarks" / f"{name}.jsonl", recs)
            report["benchmarks"][name] = len(recs)
            bench_records += recs
        decon = Decontaminator(bench_records, n=args.ngram, min_tokens=args.min_tokens)

        seen: dict[str, str] = {}
        train: list[dict] = []
        for source, path, reader in (
            ("math_train", args.math_train, math_train_records),
            ("numina", args.numina, numina_records),
        ):
            if path is None:
                continue
            recs, no_answer = reader(path)
            rep = SourceReport(read=len(recs) + no_answer, dropped_no_answer=no_answer)
            recs, dups = dedupe(recs, seen)
            rep.duplicates = len(dups)
            recs, dirty = decon.filter(recs, rep)
            rep.kept = len(recs)
            removed += [{"reason": "duplicate", **r} for r in dups] + [
                {"reason": "contaminated", **r} for r in dirty
            ]
            report["sources"][source] = dataclasses.asdict(rep)
            train += recs
        if train:
            write_jsonl_atomic(out / "train_prompts.jsonl", train)

        if args.t1_sft is not None:
            recs = t1_sft_records(args.t1_sft)
            rep = SourceReport(read=len(recs))
            # SFT: a duplicate is the same whole conversation (several traces of one problem may be kept)
            recs, dups = dedupe(recs, key=lambda r: r["question"] + "\x00" + r["messages"][-1]["content"])
            rep.duplicates = len(dups)
            recs, dirty = decon.filter(recs, rep)
            rep.kept = len(recs)
            removed += [{"reason": "duplicate", **r} for r in dups] + [
                {"reason": "contaminated", **r} for r in dirty
            ]
            report["sources"]["t1_sft"] = dataclasses.asdict(rep)
            write_jsonl_atomic(
                out / "t1_sft.jsonl", [{"messages": r["messages"], "answer": r["answer"]} for r in recs]
            )
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    write_jsonl_atomic(out / "removed.jsonl", removed)
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    print(f"benchmarks: {report['benchmarks']}")
    print(f"{'source':<12} {'read':>8} {'no_answer':>10} {'duplicates':>11} {'contaminated':>13} {'kept':>8}")
    for name, r in report["sources"].items():
        print(
            f"{name:<12} {r['read']:>8} {r['dropped_no_answer']:>10} {r['duplicates']:>11} "
            f"{r['contaminated']:>13} {r['kept']:>8}   {r['by_benchmark'] or ''}"
        )
    print(f"wrote {out}/ (report.json, removed.jsonl)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
