"""The eval command: run folder contents agree with each other (results recomputed from the per-
response jsonl, the scaling table from its jsonl, the plot from the table), checkpoint resolution
(HF folder, Megatron checkpoint exported on the fly) and one-line errors."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from megatron_t1.eval import cli
from megatron_t1.eval.heldout import pass_at_1
from megatron_t1.eval.plot import SERIES_KEY, read_png_text
from megatron_t1.rollout.engine import Completion, PromptCompletions

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "eval"


@pytest.fixture(scope="module")
def tok():
    from megatron_t1.data.synthetic import make_sft_examples
    from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer

    return train_tokenizer(chat_corpus(make_sft_examples(200, seed=7)), 400)


def _tiny_hf(tok, path: Path, seed: int) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dirs(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    return _tiny_hf(tok, d / "a", 1), _tiny_hf(tok, d / "b", 2)


class ScriptedEngine:
    """Sample k of problem i (i in file order) is right iff k <= i (then the next ones are wrong);
    its thinking has 5 + k lines "ok". A summarising pass answers right iff it kept >= 12 tokens."""

    def __init__(self, tok, golds: dict[str, tuple[int, str]], shift: int):
        self.tok, self.golds, self.shift = tok, golds, shift

    def _gold(self, text: str) -> tuple[int, str]:
        for q, (i, g) in self.golds.items():
            if q in text:
                return i, g
        raise AssertionError(f"unknown question in {text[-200:]!r}")

    def generate(self, prompts, n, params):
        out = []
        for p in prompts:
            text = self.tok.decode(p)
            i, gold = self._gold(text)
            comps = []
            for k in range(n):
                if "</think>" in text:  # a summarising pass: count the kept thinking tokens
                    head = text.split("<|im_start|>assistant\n")[-1]
                    kept = len(self.tok(head.split("</think>")[0], add_special_tokens=False)["input_ids"])
                    reply = f"The answer is \\boxed{{{gold if kept >= 12 else 'x'}}}."
                else:
                    ok = k <= i + self.shift
                    thinking = "\n".join("ok" for _ in range(5 + k))
                    reply = f"<think>\n{thinking}\n</think>\nThe answer is \\boxed{{{gold if ok else 'x'}}}."
                ids = self.tok(reply, add_special_tokens=False)["input_ids"][: params.max_tokens]
                finish = "length" if len(ids) == params.max_tokens else "stop"
                comps.append(Completion(ids, self.tok.decode(ids), [0.0] * len(ids), finish))
            out.append(PromptCompletions(list(p), comps))
        return out

    def close(self):
        pass


def _golds() -> dict[str, tuple[int, str]]:
    """question -> (index within its benchmark, reference answer)."""
    from megatron_t1.eval.loaders import load_benchmark

    out = {}
    for spec in (f"heldout={FIX / 'heldout.jsonl'}", f"math500={FIX / 'math500.jsonl'}"):
        for i, p in enumerate(load_benchmark(spec)[1]):
            out[p.question] = (i, p.answer)
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_run_folder_is_consistent(tok, hf_dirs, tmp_path, monkeypatch, capsys):
    engines = {}

    def fake_engine(hf_dir, **kw):
        shift = 0 if Path(hf_dir).name == "a" else 1
        engines[Path(hf_dir).name] = kw
        return ScriptedEngine(tok, _golds(), shift)

    monkeypatch.setattr(cli, "_load_engine", fake_engine)
    out = tmp_path / "run"
    rc = cli.main(
        [
            "--checkpoint",
            f"sft={hf_dirs[0]}",
            "--checkpoint",
            f"rl={hf_dirs[1]}",
            "--benchmarks",
            f"heldout={FIX / 'heldout.jsonl'},math500",
            "--data-dir",
            str(FIX),
            "--n",
            "3",
            "--max-new-tokens",
            "64",
            "--budgets",
            "8,18,64",
            "--summary-max-tokens",
            "12",
            "--num-workers",
            "0",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert set(engines) == {"a", "b"}
    results = json.loads((out / "results.json").read_text())
    responses = _jsonl(out / "responses.jsonl")
    assert len(responses) == 2 * (2 + 4) * 3
    # pass@1 recomputed from the per-response file, and the hand-computed value for "sft"/heldout:
    # problem 0 right in sample 0 only (1/3), problem 1 in samples 0-1 (2/3) -> 0.5, stderr 1/6
    per: dict = defaultdict(lambda: defaultdict(list))
    for r in responses:
        per[(r["checkpoint"], r["benchmark"])][r["problem_id"]].append(r["correct"])
    for b in results["benchmarks"]:
        acc, se = pass_at_1(list(per[(b["checkpoint"], b["benchmark"])].values()))
        assert b["overall"]["accuracy"] == pytest.approx(acc)
        assert b["overall"]["stderr"] == pytest.approx(se)
    sft_held = next(
        b for b in results["benchmarks"] if (b["checkpoint"], b["benchmark"]) == ("sft", "heldout")
    )
    assert sft_held["overall"]["accuracy"] == pytest.approx(0.5)
    assert sft_held["overall"]["stderr"] == pytest.approx(1 / 6)
    rl_math = next(b for b in results["benchmarks"] if (b["checkpoint"], b["benchmark"]) == ("rl", "math500"))
    assert rl_math["overall"]["accuracy"] == pytest.approx((2 + 3 + 3 + 3) / 12)
    assert set(rl_math["by_subject"]) == {"Prealgebra", "Algebra"} and set(rl_math["by_level"]) == {
        "1",
        "2",
        "4",
    }
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    overall = {(r["checkpoint"], r["benchmark"]): float(r["accuracy"]) for r in rows if r["group"] == "all"}
    assert overall[("sft", "heldout")] == pytest.approx(0.5) and len(rows) == 2 * (1 + 0 + 0) + 2 * (
        1 + 2 + 3
    )
    # the scaling table from its own per-response file
    with open(out / "scaling.csv", newline="") as f:
        scaling = list(csv.DictReader(f))
    assert len(scaling) == 2 * 2 * 3
    srecs = _jsonl(out / "scaling_responses.jsonl")
    for row in scaling:
        sel = [
            r
            for r in srecs
            if (r["checkpoint"], r["benchmark"], r["budget"])
            == (row["checkpoint"], row["benchmark"], int(row["budget"]))
        ]
        groups = defaultdict(list)
        for r in sel:
            groups[r["problem_id"]].append(r["correct"])
        acc, _ = pass_at_1(list(groups.values()))
        assert float(row["accuracy"]) == pytest.approx(acc)
        assert float(row["mean_tokens"]) == pytest.approx(sum(r["tokens"] for r in sel) / len(sel))
        assert all(r["thinking_tokens"] <= int(row["budget"]) for r in sel if r["summarised"])
    # at the full budget nothing is cut: the sweep equals the plain evaluation
    for b in results["benchmarks"]:
        full = next(
            r
            for r in scaling
            if (r["checkpoint"], r["benchmark"], r["budget"]) == (b["checkpoint"], b["benchmark"], "64")
        )
        assert float(full["accuracy"]) == pytest.approx(b["overall"]["accuracy"])
        assert float(full["summarised"]) == 0.0
    # budget 8 cuts every sample (17-23 thinking tokens); the summariser needs 12 tokens: all wrong
    assert all(
        float(r["accuracy"]) == 0.0 and float(r["summarised"]) == 1.0 for r in scaling if r["budget"] == "8"
    )
    # budget 18: sample 0 (17 thinking tokens) stands, samples 1-2 (20, 23) are cut at 18 and the
    # summariser answers them right
    for r in scaling:
        if r["budget"] == "18":
            assert float(r["summarised"]) == pytest.approx(2 / 3) and float(r["accuracy"]) >= 2 / 3
    # the plot's curves are the table's rows
    series = json.loads(read_png_text(out / "scaling.png")[SERIES_KEY])
    for row in scaling:
        s = series[row["benchmark"]][row["checkpoint"]]
        i = s["budget"].index(float(row["budget"]))
        assert s["accuracy"][i] == pytest.approx(float(row["accuracy"]))
    assert results["files"]["scaling_png"] == "scaling.png" and not list(out.glob(".*.tmp"))
    printed = capsys.readouterr().out
    assert "mean_thinking_tokens" in printed and "pass@1 = 0.5000" in printed


def test_scaling_limit_sweeps_the_first_problems_only(tok, hf_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_load_engine", lambda hf_dir, **kw: ScriptedEngine(tok, _golds(), 0))
    out = tmp_path / "run"
    args = ["--checkpoint", f"sft={hf_dirs[0]}", "--benchmarks", "math500", "--data-dir", str(FIX)]
    args += ["--n", "2", "--max-new-tokens", "64", "--budgets", "8,64", "--summary-max-tokens", "12"]
    assert cli.main(args + ["--scaling-limit", "3", "--num-workers", "0", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["benchmarks"][0]["overall"]["num_problems"] == 4  # the plain evaluation: all
    assert results["settings"]["scaling_limit"] == 3
    evaluated = [r["problem_id"] for r in _jsonl(out / "responses.jsonl")]
    swept = {r["problem_id"] for r in _jsonl(out / "scaling_responses.jsonl")}
    assert len(set(evaluated)) == 4 and swept == set(list(dict.fromkeys(evaluated))[:3])
    # at the full budget the sweep equals the plain evaluation of those 3 problems (1/2, 2/2, 2/2)
    full = next(r for r in results["scaling"] if r["budget"] == 64)
    assert full["num_problems"] == 3 and full["accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    with pytest.raises(ValueError, match="scaling_limit=0"):
        cli.run_eval(
            [f"sft={hf_dirs[0]}"], {}, tmp_path / "x", n=1, temperature=0.0, max_new_tokens=8, scaling_limit=0
        )


def test_real_hf_engine_smoke(hf_dirs, tmp_path):
    out = tmp_path / "run"
    rc = cli.main(
        [
            "--checkpoint",
            str(hf_dirs[0]),
            "--benchmarks",
            f"h={FIX / 'heldout.jsonl'}",
            "--n",
            "2",
            "--temperature",
            "1.0",
            "--max-new-tokens",
            "8",
            "--budgets",
            "4,8",
            "--summary-max-tokens",
            "4",
            "--num-workers",
            "0",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    recs = _jsonl(out / "responses.jsonl")
    assert len(recs) == 4 and all(r["tokens"] <= 8 for r in recs) and recs[0]["checkpoint"] == "a"
    assert json.loads((out / "results.json").read_text())["settings"]["top_p"] == 0.95


def test_megatron_checkpoint_is_exported_with_tokenizer(tok, hf_dirs, tmp_path):
    from megatron_t1.convert.offline import hf_to_mcore
    from megatron_t1.errors import CheckpointError

    ck = tmp_path / "run1" / "checkpoints" / "step_0000005"
    hf_to_mcore(hf_dirs[0], ck, progress=False)
    (ck.parent / "latest").write_text("step_0000005\n")
    label, hf, exported = cli.resolve_checkpoint(str(ck.parent), tmp_path / "out")
    assert (label, exported) == ("run1/step_0000005", True)
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(hf_dirs[0]).state_dict()
    b = AutoModelForCausalLM.from_pretrained(hf).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (hf / "tokenizer.json").is_file()
    # without stored tokenizer files: --tokenizer, else a clear error
    for f in (ck / "hf").iterdir():
        if f.name != "config.json":
            f.unlink()
    with pytest.raises(CheckpointError, match="pass --tokenizer"):
        cli.resolve_checkpoint(f"x={ck}", tmp_path / "out")
    label, hf, _ = cli.resolve_checkpoint(f"x={ck}", tmp_path / "out", tokenizer=str(hf_dirs[0]))
    assert label == "x" and (hf / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--benchmarks", "aime2024", "--data-dir", "/nonexistent"], "benchmark 'aime2024': no data file"),
        (["--benchmarks", "math500", "--budgets", "100", "--max-new-tokens", "50"], "--budgets: 100 > "),
        (["--benchmarks", "math500", "--checkpoint", "/nonexistent/ck"], "checkpoint folder not found"),
        (["--benchmarks", "math500", "--checkpoint", str(FIX)], "neither an HF folder"),
    ],
)
def test_errors_are_one_line_and_leave_no_output(tmp_path, capsys, extra, message, hf_dirs):
    args = ["--data-dir", str(FIX), "--out", str(tmp_path / "o"), "--num-workers", "0"]
    if "--checkpoint" not in extra:
        args += ["--checkpoint", str(hf_dirs[0])]
    rc = cli.main(args + extra)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert (
        not (tmp_path / "o" / "responses.jsonl").exists() and not (tmp_path / "o" / "results.json").exists()
    )


def test_nan_stderr_is_null_in_json(tok, hf_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_load_engine", lambda hf_dir, **kw: ScriptedEngine(tok, _golds(), 0))
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"question": "Compute 4 + 5.", "answer": "9"}) + "\n")
    rc = cli.main(
        [
            "--checkpoint",
            str(hf_dirs[0]),
            "--benchmarks",
            f"one={one}",
            "--n",
            "2",
            "--max-new-tokens",
            "64",
            "--num-workers",
            "0",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())["benchmarks"][0]
    assert res["overall"]["stderr"] is None and math.isclose(res["overall"]["accuracy"], 0.5)
    assert not (tmp_path / "r" / "scaling.csv").exists()


def test_a_failing_run_leaves_the_old_files_and_no_temporaries(tok, hf_dirs, tmp_path, monkeypatch):
    from megatron_t1.convert.offline import hf_to_mcore

    class DiesInTheSweep(ScriptedEngine):
        def generate(self, prompts, n, params):
            if "</think>" in self.tok.decode(prompts[0]):  # a summarising pass
                raise RuntimeError("engine died")
            return super().generate(prompts, n, params)

    monkeypatch.setattr(cli, "_load_engine", lambda hf_dir, **kw: DiesInTheSweep(tok, _golds(), 0))
    ck = tmp_path / "ck"
    hf_to_mcore(hf_dirs[0], ck, progress=False)  # exported to OUT/hf/LABEL on the fly
    out = tmp_path / "run"
    out.mkdir()
    (out / "responses.jsonl").write_text("from an earlier run\n")
    args = ["--checkpoint", f"m={ck}", "--benchmarks", "math500", "--data-dir", str(FIX), "--n", "2"]
    args += ["--max-new-tokens", "64", "--budgets", "8,64", "--summary-max-tokens", "12"]
    with pytest.raises(RuntimeError, match="engine died"):
        cli.main(args + ["--num-workers", "0", "--out", str(out)])
    # the responses of the benchmark were generated (and streamed to a temporary), then discarded
    assert sorted(p.name for p in out.iterdir()) == ["responses.jsonl"]
    assert (out / "responses.jsonl").read_text() == "from an earlier run\n"
