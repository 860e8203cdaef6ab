"""End to end: a tiny policy SFT'd for ~40 s inside the test (Megatron-Core on CPU), then the real
eval command on two of its checkpoints (exported on the fly): pass@1 tables, every response in a
jsonl, the inference-scaling sweep with its table and plot, all consistent with each other."""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict

import pytest

from tests.e2e.proc import run_cli

pytestmark = pytest.mark.slow


def _run(args, timeout):
    return run_cli(args, timeout=timeout)


def _eval_command() -> list[str]:
    """``python -m megatron_t1 eval``."""
    return [sys.executable, "-m", "megatron_t1", "eval"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from megatron_t1.data.synthetic import make_problems, make_sft_examples
    from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer

    d = tmp_path_factory.mktemp("evale2e")
    # two-operand sums of 1-2 digit numbers, clean traces, 20% answer-from-truncated-thinking examples
    easy = {"n_operands": (2, 2), "digits": (1, 2)}
    ex = make_sft_examples(1500, seed=3, error_rate=0.0, truncated_fraction=0.2, **easy)
    with open(d / "train.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in ex)
    with open(d / "heldout.jsonl", "w") as f:
        for p in make_problems(8, 1, "heldout", **easy):
            f.write(json.dumps({"question": p.question, "answer": p.answer}) + "\n")
    train_tokenizer(chat_corpus(ex), 320, d / "tok")
    (d / "sft.yaml").write_text(f"""
model: {{num_layers: 2, hidden_size: 64, ffn_hidden_size: 128, num_attention_heads: 4, num_query_groups: 2,
        vocab_size: 320, max_position_embeddings: 256, tokenizer: {d / "tok"}}}
data: {{train_path: {d / "train.jsonl"}, seq_length: 256, micro_batch_size: 8, global_batch_size: 8}}
optim: {{lr: 5.0e-3, lr_warmup_steps: 5, min_lr: 5.0e-4}}
run: {{name: tiny, output_dir: {d}, train_steps: 80, device: cpu}}
checkpoint: {{save_interval: 40, keep_last: 2}}
log: {{progress_bar: false}}
""")
    r = _run([sys.executable, "-m", "megatron_t1", "sft", "--config", str(d / "sft.yaml")], timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def test_eval_of_a_freshly_trained_policy(trained):
    d = trained
    out = d / "eval"
    ck = d / "tiny" / "checkpoints"
    r = _run(
        _eval_command()
        + [
            "--checkpoint",
            f"step40={ck / 'step_0000040'}",
            "--checkpoint",
            str(ck),
            "--benchmarks",
            f"heldout={d / 'heldout.jsonl'}",
            "--n",
            "2",
            "--temperature",
            "0.7",
            "--top-p",
            "1.0",
            "--max-new-tokens",
            "64",
            "--budgets",
            "16,64",
            "--summary-max-tokens",
            "16",
            "--num-workers",
            "1",
            "--out",
            str(out),
        ],
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mean_thinking_tokens" in r.stdout and "pass@1 = " in r.stdout
    results = json.loads((out / "results.json").read_text())
    assert [b["checkpoint"] for b in results["benchmarks"]] == ["step40", "tiny/step_0000080"]
    responses = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 2 * 8 * 2
    per = defaultdict(lambda: defaultdict(list))
    for x in responses:
        per[x["checkpoint"]][x["problem_id"]].append(x["correct"])
        assert x["reason"] in ("correct", "wrong", "no_answer", "overlong", "repetition", "garbage")
        assert x["correct"] == (1.0 if x["reason"] == "correct" else 0.0) and x["tokens"] <= 64
    from megatron_t1.eval.heldout import pass_at_1

    for b in results["benchmarks"]:
        acc, se = pass_at_1(list(per[b["checkpoint"]].values()))
        assert b["overall"]["accuracy"] == pytest.approx(acc)
        assert b["overall"]["stderr"] == pytest.approx(se, nan_ok=True) or b["overall"]["stderr"] is None
    # a minute of SFT teaches the format: most final-checkpoint responses think, close and box an answer
    final = [x for x in responses if x["checkpoint"] == "tiny/step_0000080"]
    assert sum(x["extracted"] is not None for x in final) >= 0.5 * len(final)
    assert sum("</think>" in x["response"] for x in final) >= 0.5 * len(final)
    # scaling: 2 checkpoints x 2 budgets, table == plot data; at N = 64 only the over-long are cut
    with open(out / "scaling.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(x["checkpoint"], int(x["budget"])) for x in rows] == [
        (c, n) for c in ("step40", "tiny/step_0000080") for n in (16, 64)
    ]
    from megatron_t1.eval.plot import SERIES_KEY, read_png_text

    series = json.loads(read_png_text(out / "scaling.png")[SERIES_KEY])["heldout"]
    for x in rows:
        s = series[x["checkpoint"]]
        assert s["accuracy"][s["budget"].index(float(x["budget"]))] == pytest.approx(float(x["accuracy"]))
    srecs = [json.loads(x) for x in (out / "scaling_responses.jsonl").read_text().splitlines()]
    assert len(srecs) == 2 * 2 * 8 * 2
    for x in srecs:
        if x["summarised"]:
            assert x["thinking_tokens"] <= x["budget"]
    overlong = {
        (x["checkpoint"], x["problem_id"], x["sample"]) for x in responses if x["reason"] == "overlong"
    }
    cut64 = {
        (x["checkpoint"], x["problem_id"], x["sample"])
        for x in srecs
        if x["budget"] == 64 and x["summarised"]
    }
    assert cut64 <= overlong
    assert not (out / "hf").exists()  # exports removed
