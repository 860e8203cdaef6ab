"""Throughput of the n-gram decontamination in tools/prepare_data.py (megatron_t1.eval.prepare).

Index: a benchmark set the size of MATH500 + AIME + Omni-MATH-500 + GPQA (~1.2k questions, a quarter
shorter than the window); queries: training questions of NuminaMath's typical length. Texts are
random word sequences from a 5k-word vocabulary (the cost depends on token counts, not content).
Prints index build time and questions/s, and the projected time for NuminaMath-CoT (~860k rows).

    python bench/decontam.py [--queries 20000]
"""

from __future__ import annotations

import argparse
import random
import time

from megatron_t1.eval.prepare import Decontaminator


def _text(rng: random.Random, vocab: list[str], n: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=20000)
    ap.add_argument("--ngram", type=int, default=13)
    args = ap.parse_args()
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    bench = [
        {
            "id": f"b{i}",
            "source": "bench",
            "question": _text(rng, vocab, rng.randint(8, 12) if i % 4 == 0 else rng.randint(30, 120)),
        }
        for i in range(1200)
    ]
    queries = [_text(rng, vocab, rng.randint(20, 150)) for _ in range(args.queries)]
    t0 = time.perf_counter()
    d = Decontaminator(bench, n=args.ngram)
    t_index = time.perf_counter() - t0
    t0 = time.perf_counter()
    hits = sum(d.match(q) is not None for q in queries)
    t_match = time.perf_counter() - t0
    rate = len(queries) / t_match
    print(f"{'benchmark questions':<28}{len(bench):>10}")
    print(f"{'indexed n-grams':<28}{len(d.grams):>10}")
    print(f"{'index build (s)':<28}{t_index:>10.3f}")
    print(f"{'queries':<28}{len(queries):>10}")
    print(f"{'matched (random text)':<28}{hits:>10}")
    print(f"{'questions / s':<28}{rate:>10.0f}")
    print(f"{'projected 860k rows (s)':<28}{860_000 / rate:>10.0f}")


if __name__ == "__main__":
    main()
