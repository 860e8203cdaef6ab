"""Benchmark: T1's reward on one RL batch (32 prompts x 64 samples = 2,048 responses).

    python bench/reward.py                 # 2 workers, 3 measured batches
    python bench/reward.py --rounds 1      # quick look
    python bench/reward.py --json out.json

Responses are synthetic but shaped like real ones: 2-8k characters of LaTeX-laden reasoning
(T1-style ``<think>...</think>`` + summary for half of them, "**Final Answer**" + ``\\boxed{}`` for
the others), 32 MATH-like references (fractions, radicals, intervals, sets, tuples, equations,
degrees, percentages, text, matrices, thousands separators, multiple choice), and per prompt a mix
of correct answers written in another equivalent form, wrong look-alikes, final-answer phrases
without a box, missing answers, truncated (over-long), repetitive and garbled responses. 20 of the
2,048 are adversarial: a normal body ending in ``\\boxed{9^{9^{9}}}``, ``(x+y+z+1)^{40}``, ...

Measured, each on a warm scorer (workers started, one unmeasured batch first):
  * the 2,028 ordinary responses, with the pool (target <= 10 s wall);
  * the same 2,028 in this process, no pool (single-process throughput);
  * pool efficiency = pool throughput / (workers x single-process throughput) (target >= 0.8),
    and the same in CPU seconds (single-process CPU / (workers' + parent's CPU)), which load from
    other processes on a shared machine does not distort;
  * the full 2,048 (ordinary + adversarial): its extra wall time over the ordinary batch (target
    <= 20 x timeout_s / workers + 2 s), and the 20 adversarial ones alone.
Each round uses a fresh seed (answer strings differ, so no cache carries over); medians reported.
The agreement columns compare the reward with the label the generator intended (a check that
equivalent forms are recognised, not a benchmark target).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_t1.reward import RewardConfig, RewardScorer  # noqa: E402
from megatron_t1.reward.pool import _process_cpu  # noqa: E402

PMAT = "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"
# gold, equivalent forms (correct), look-alikes (wrong)
PROBLEMS = [
    ("364", ["364", "364.0"], ["346", "365"]),
    ("\\frac{1}{2}", ["0.5", "\\dfrac{1}{2}", "\\frac{2}{4}", "1/2"], ["\\frac{1}{3}", "2", "0.52"]),
    ("2\\sqrt{2}", ["\\sqrt{8}", "2\\sqrt2", "2 \\sqrt{2}"], ["\\sqrt{2}", "4", "2\\sqrt{3}"]),
    ("[1,3)", ["[1, 3)", "\\left[1,3\\right)"], ["[1,3]", "(1,3)"]),
    ("\\{1,2,3\\}", ["\\{3,2,1\\}", "\\{1, 2, 3\\}"], ["\\{1,2\\}", "\\{1,2,4\\}"]),
    ("3", ["x = 3", "3", "x=3"], ["x=-3", "-3", "9"]),
    ("90^\\circ", ["90", "90^{\\circ}", "90^\\circ"], ["45^\\circ", "180"]),
    ("25\\%", ["25\\%", "0.25", "25"], ["0.52", "52\\%"]),
    ("\\text{Monday}", ["\\text{Monday}", "Monday"], ["\\text{Tuesday}", "\\text{Sunday}"]),
    (
        PMAT,
        [PMAT, "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}"],
        ["\\begin{pmatrix}2&1\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&3\\\\2&4\\end{pmatrix}"],
    ),
    ("1000000", ["1,000,000", "10^6", "1000000"], ["100000", "1,000,001"]),
    (
        "\\frac{\\sqrt{3}}{2}",
        ["\\dfrac{\\sqrt3}{2}", "\\frac{1}{2}\\sqrt{3}"],
        ["\\frac{\\sqrt{2}}{2}", "\\frac{1}{2}"],
    ),
    ("(1,-2)", ["\\left(1,-2\\right)", "(1, -2)"], ["(-2,1)", "(1,2)"]),
    ("x^2+2x+1", ["(x+1)^2", "x^2 + 2x + 1", "1+2x+x^2"], ["x^2+1", "(x-1)^2"]),
    ("\\frac{3}{4}", ["0.75", "\\dfrac34", "\\tfrac{3}{4}"], ["\\frac{4}{3}", "0.57"]),
    ("5\\text{ cm}", ["5", "5\\text{ cm}", "5 \\mathrm{cm}"], ["6", "50"]),
    ("-7", ["-7", "-7.0"], ["7", "-6"]),
    ("\\pi", ["\\pi"], ["3.14", "2\\pi"]),
    ("2023", ["2023", "2,023"], ["2022", "2024"]),
    ("y=2x+1", ["y = 2x + 1", "y=1+2x"], ["y=2x-1", "y=x+1"]),
    ("\\frac{7}{12}", ["\\frac{7}{12}", "\\dfrac{7}{12}", "0.583333"], ["\\frac{5}{12}", "0.58"]),
    ("(-\\infty, 2]", ["(-\\infty,2]", "\\left(-\\infty, 2\\right]"], ["(-\\infty,2)", "[2,\\infty)"]),
    ("\\sqrt{5}", ["\\sqrt{5}", "5^{1/2}"], ["5", "\\sqrt{3}"]),
    ("12", ["12", "12.0"], ["13", "21"]),
    ("\\frac{1}{6}", ["\\frac16", "\\frac{2}{12}"], ["\\frac{1}{5}", "6"]),
    ("4\\sqrt{3}", ["4\\sqrt3", "\\sqrt{48}"], ["3\\sqrt{4}", "4\\sqrt{2}"]),
    ("0", ["0", "0.0"], ["1", "-1"]),
    ("B", ["B", "(B)"], ["A", "C", "D"]),
    ("e^2", ["e^{2}", "e^2"], ["e", "2e"]),
    ("\\frac{\\pi}{3}", ["\\frac{\\pi}{3}", "\\dfrac{\\pi}{3}"], ["\\frac{\\pi}{6}", "\\frac{2\\pi}{3}"]),
    ("\\frac{1}{4}", ["0.25", "\\frac14", "25\\%"], ["\\frac{1}{2}", "4"]),
    ("17", ["17"], ["71", "16"]),
]
ADVERSARIAL = [
    "9^{9^{9}}",
    "2^{2^{30}}",
    "10^{10^{10}}",
    "(10^{100000})!",
    "\\binom{10^{9}}{10^{8}}",
    "99999999999^{99999999}",
    "e^{10^{10}}",
    "9^{9^{9^{9}}}",
    "(x+y+z+1)^{40}",
    "(a+b+c+d+e+1)^{25}",
    "(" * 300 + "1" + ")" * 300,
    "(" * 100_000 + "1" + ")" * 100_000,
    "x_{1}x_{2}" * 200,
    "\\sqrt{2^{2^{40}}}",
    "3\\cdot 2^{2^{30}}",
    "\\frac{1}{9^{9^{9}}}",
    "2^{2^{2^{2^{2}}}}",
    "\\prod_{k=1}^{10^{6}} k",
    "(x+1)^{2000} - (x-1)^{2000}",
    "\\sum_{k=1}^{10^{12}} k^{3}",
]
SENTENCES = [
    "First, rewrite the condition as ${a}x^2 + {b}x - {c} = 0$ and look at its discriminant.",
    "We have $\\frac{{{a}}}{{{b}}} + \\frac{{{c}}}{{{d}}} = \\frac{{{a} {d} + {b} {c}}}{{{b} {d}}}$.",
    "Let me check this: ${a} \\times {b} = {ab}$, which matches the earlier value.",
    "Wait, that does not look right. Let me recompute the sum of the first {a} terms.",
    "By AM-GM, $\\frac{{x_{a} + y_{b}}}{{2}} \\ge \\sqrt{{x_{a} y_{b}}}$, equality at $x_{a} = y_{b}$.",
    "Substituting $x = {a}$ gives ${a}^2 - {b} = {a2b}$, so this case gives {a2b}.",
    "So the discriminant is $\\Delta = {b}^2 - 4 \\cdot {a} \\cdot {c} = {disc}$.",
    "Hmm, I should double-check the case $n = {a}$ separately, since the formula may fail there.",
    "The area of the triangle is $\\frac{{1}}{{2}} \\cdot {a} \\cdot {b} = {half}$.",
    "Consider $f(x) = x^{{{a}}} - {b}x$; then $f'(x) = {a}x^{{{am1}}} - {b}$, which vanishes at one point.",
    "Plugging back in, the left side is {ab} and the right side is {ab}, so the check passes.",
    "Alternatively, count the complement: there are $\\binom{{{a}}}{{2}} = {binom}$ pairs in total.",
    "Since $\\gcd({a}, {b}) = {g}$, the fraction $\\frac{{{a}}}{{{b}}}$ reduces by {g}.",
    "Modulo {p}, we get ${a} \\equiv {amodp} \\pmod{{{p}}}$, which narrows the candidates to {c} values.",
    "Setting up ${a}t + {b} = {c}t - {d}$ gives $t = \\frac{{{bd}}}{{{ca}}}$ when ${c} \\ne {a}$.",
    "Let me verify with a small example: for $n = {c}$ the formula gives {cc}, and counting gives {cc}.",
    "That contradicts the assumption that $k \\le {a}$, so this branch is impossible.",
    "Now use the identity $\\sin^2\\theta + \\cos^2\\theta = 1$ with $\\cos\\theta = \\frac{{{a}}}{{{a1}}}$.",
    "The sequence satisfies $u_{{n+1}} = {a}u_n - {b}$, so $u_{{{c}}}$ follows by iterating {c} times.",
    "Taking logarithms, $\\log_{{{a1}}} {ab} = \\log_{{{a1}}} {a} + \\log_{{{a1}}} {b}$.",
    "I think there is an error in step {c}; going back, the coefficient should be {d}, not {a}.",
    "Summing over all residues gives $\\sum_{{i=1}}^{{{a}}} i = {tri}$.",
    "Therefore the probability is $\\frac{{{g}}}{{{ab}}}$ for this configuration, and we add the other case.",
    "Check: {ab} divided by {a} is {b}, correct.",
    "So far we have {c} valid choices for the first digit and {d} for the second.",
    "The vectors $({a}, {b})$ and $({c}, {d})$ span a parallelogram of area $|{a} {d} - {b} {c}|$.",
]


def _sentence(rng: random.Random) -> str:
    a, b, c, d = (rng.randint(2, 99) for _ in range(4))
    p = rng.choice([3, 5, 7, 11, 13])
    vals = dict(
        a=a,
        b=b,
        c=c,
        d=d,
        p=p,
        ab=a * b,
        a2b=a * a - b,
        disc=b * b - 4 * a * c,
        half=a * b / 2,
        am1=a - 1,
        binom=a * (a - 1) // 2,
        g=math.gcd(a, b),
        amodp=a % p,
        bd=b + d,
        ca=c - a,
        cc=c * c,
        a1=a + 1,
        tri=a * (a + 1) // 2,
    )
    return rng.choice(SENTENCES).format(**vals)


def _body(rng: random.Random, chars: int) -> str:
    parts, size = [], 0
    while size < chars:
        para = " ".join(_sentence(rng) for _ in range(rng.randint(3, 6)))
        parts.append(para)
        size += len(para) + 2
    return "\n\n".join(parts)


def _respond(
    rng: random.Random, answer: str | None, *, phrase: bool = False, chars: int | None = None
) -> str:
    body = _body(rng, chars if chars is not None else rng.randint(1800, 7600))
    if answer is None:
        return body
    if phrase:
        final = f"The final answer is ${answer}$. I hope it is correct."
    else:
        final = f"**Final Answer**\n\\[\\boxed{{{answer}}}\\]"
    if rng.random() < 0.5:  # T1 style: thinking, then a short summary
        return f"<think>\n{body}\n</think>\nSummarising the steps above.\n\n{final}"
    return f"{body}\n\n{final}"


def make_batch(seed: int, prompts: int = 32, samples: int = 64, adversarial: int = 20):
    """(responses, golds, truncated, labels, is_adversarial): prompt-major, like a rollout batch."""
    rng = random.Random(seed)
    responses, golds, truncated, labels = [], [], [], []
    for p in range(prompts):
        gold, right, wrong = PROBLEMS[p % len(PROBLEMS)]
        for _ in range(samples):
            u = rng.random()
            trunc = False
            if u < 0.45:
                label, text = "correct", _respond(rng, rng.choice(right))
            elif u < 0.80:
                label, text = "wrong", _respond(rng, rng.choice(wrong))
            elif u < 0.85:
                label, text = "correct", _respond(rng, rng.choice(right), phrase=True)
            elif u < 0.89:
                label, text = "wrong", _respond(rng, None)
            elif u < 0.95:
                label, text, trunc = "penalty", _respond(rng, None, chars=rng.randint(6000, 9000)), True
            elif u < 0.98:
                loop = _sentence(rng) + " "
                label = "penalty"
                text = _respond(rng, rng.choice(right), chars=1500).replace("**Final", loop * 60 + "**Final")
            else:
                label, text = "penalty", _respond(rng, rng.choice(right)).replace(" the ", " the\ufffd ", 3)
            responses.append(text)
            golds.append(gold)
            truncated.append(trunc)
            labels.append(label)
    adv = [False] * len(responses)
    slots = rng.sample(range(len(responses)), adversarial)
    for i, slot in enumerate(slots):  # replace ordinary responses: the batch stays 2,048
        responses[slot] = _respond(rng, ADVERSARIAL[i % len(ADVERSARIAL)], chars=rng.randint(2000, 4000))
        golds[slot], truncated[slot], labels[slot], adv[slot] = "3", False, "adversarial", True
    return responses, golds, truncated, labels, adv


def _cpu(pids) -> float:
    """Total CPU seconds of these workers (a worker replaced meanwhile counts as 0: see restarts)."""
    return sum(_process_cpu(p) or 0.0 for p in pids)


def _subset(batch, keep):
    return [[col[i] for i in range(len(col)) if keep[i]] for col in batch]


def _agreement(rewards, labels) -> tuple[int, Counter]:
    want = {"correct": 1.0, "wrong": 0.0, "penalty": -1.0}
    bad = Counter(lab for r, lab in zip(rewards, labels) if lab in want and r != want[lab])
    return sum(lab in want for lab in labels), bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    cfg = RewardConfig(num_workers=args.workers)
    print(
        f"cpus {os.cpu_count()}, affinity {len(os.sched_getaffinity(0))}, "
        f"load avg {os.getloadavg()[0]:.1f}, timeout_s {cfg.timeout_s}, wall_guard_s {cfg.wall_guard_s}"
    )
    rows = []
    t0 = time.perf_counter()
    with RewardScorer(cfg) as pool, RewardScorer(RewardConfig(num_workers=0)) as local:
        pool.wait_ready()
        startup = time.perf_counter() - t0
        warm = make_batch(1000)
        pool.score(warm[0], warm[1], truncated=warm[2])  # steady state: first batch not measured
        local.score(warm[0][:256], warm[1][:256], truncated=warm[2][:256])
        for r in range(args.rounds):
            batch = make_batch(r)
            chars = [len(x) for x, a in zip(batch[0], batch[4]) if not a]
            ordinary = _subset(batch, [not a for a in batch[4]])
            adversarial = _subset(batch, batch[4])
            row = {
                "seed": r,
                "n_ordinary": len(ordinary[0]),
                "n_adversarial": len(adversarial[0]),
                "chars_median": statistics.median(chars),
            }
            pids = pool.worker_pids
            cpu0, parent0, t = _cpu(pids), time.process_time(), time.perf_counter()
            res = pool.score(ordinary[0], ordinary[1], truncated=ordinary[2])
            row["pool_ordinary_s"] = time.perf_counter() - t
            row["pool_parent_cpu_s"] = time.process_time() - parent0
            row["pool_workers_cpu_s"] = _cpu(pids) - cpu0
            n_lab, bad = _agreement(res.rewards, ordinary[3])
            row["disagree"] = dict(bad)
            row["labelled"] = n_lab
            row["reasons"] = dict(Counter(res.reasons))
            t, cpu0 = time.perf_counter(), time.process_time()
            single = local.score(ordinary[0], ordinary[1], truncated=ordinary[2])
            row["single_ordinary_s"] = time.perf_counter() - t
            row["single_cpu_s"] = time.process_time() - cpu0
            row["same_as_pool"] = single.rewards == res.rewards
            pids = pool.worker_pids
            cpu0, t = _cpu(pids), time.perf_counter()
            full = pool.score(batch[0], batch[1], truncated=batch[2])
            row["pool_full_s"] = time.perf_counter() - t
            row["pool_full_workers_cpu_s"] = _cpu(pids) - cpu0
            row["full_restarts"] = full.metrics["reward/worker_restarts"]
            pids = pool.worker_pids
            cpu0, t = _cpu(pids), time.perf_counter()
            adv = pool.score(adversarial[0], adversarial[1], truncated=adversarial[2])
            row["pool_adversarial_only_s"] = time.perf_counter() - t
            row["pool_adversarial_workers_cpu_s"] = _cpu(pids) - cpu0
            row["adversarial_restarts"] = adv.metrics["reward/worker_restarts"]
            row["adversarial_reasons"] = dict(Counter(adv.reasons))
            rows.append(row)
            print(f"round {r}: {json.dumps(row)}")
    keys = (
        "pool_ordinary_s",
        "single_ordinary_s",
        "pool_full_s",
        "pool_adversarial_only_s",
        "single_cpu_s",
        "pool_parent_cpu_s",
        "pool_workers_cpu_s",
        "pool_full_workers_cpu_s",
        "pool_adversarial_workers_cpu_s",
    )
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    n_ord = rows[0]["n_ordinary"]
    single_rate = n_ord / med["single_ordinary_s"]
    pool_rate = n_ord / med["pool_ordinary_s"]
    efficiency = pool_rate / (args.workers * single_rate)
    cpu_efficiency = med["single_cpu_s"] / (med["pool_workers_cpu_s"] + med["pool_parent_cpu_s"])
    extra = med["pool_full_s"] - med["pool_ordinary_s"]
    budget = rows[0]["n_adversarial"] * cfg.timeout_s / args.workers + 2.0
    print()
    print(f"| measurement (median of {args.rounds}) | value | target |")
    print("|---|---|---|")
    print(f"| pool start-up ({args.workers} workers, import + warm-up) | {startup:.1f} s | |")
    print(f"| {n_ord} ordinary, pool | {med['pool_ordinary_s']:.2f} s ({pool_rate:.0f}/s) | <= 10 s |")
    print(f"| {n_ord} ordinary, single process | {med['single_ordinary_s']:.2f} s ({single_rate:.0f}/s) | |")
    print(f"| pool efficiency = pool / ({args.workers} x single) | {efficiency:.2f} | >= 0.80 |")
    print(
        f"| CPU s: single {med['single_cpu_s']:.2f}, pool workers {med['pool_workers_cpu_s']:.2f} + parent "
        f"{med['pool_parent_cpu_s']:.2f}; CPU efficiency | {cpu_efficiency:.2f} | |"
    )
    print(f"| full 2,048 with the adversarial ones, pool | {med['pool_full_s']:.2f} s | |")
    print(f"| extra wall time of the adversarial ones | {extra:.2f} s | <= {budget:.1f} s |")
    extra_cpu = med["pool_full_workers_cpu_s"] - med["pool_workers_cpu_s"]
    print(
        f"| extra workers' CPU of the adversarial ones (full - ordinary) | {extra_cpu:.2f} CPU s | "
        f"<= {budget * args.workers:.1f} |"
    )
    print(
        f"| the adversarial ones alone | {med['pool_adversarial_only_s']:.2f} s, "
        f"{med['pool_adversarial_workers_cpu_s']:.2f} workers' CPU s | |"
    )
    print(f"| adversarial outcomes | {rows[-1]['adversarial_reasons']} | |")
    print(f"| reasons (ordinary, last round) | {rows[-1]['reasons']} | |")
    print(f"| label disagreements | {[r['disagree'] for r in rows]} of {rows[0]['labelled']} | |")
    if args.json:
        out = {
            "rows": rows,
            "median": med,
            "startup_s": startup,
            "efficiency": efficiency,
            "cpu_efficiency": cpu_efficiency,
            "adversarial_extra_s": extra,
        }
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
