"""Record files: jsonl / json / parquet reading with path:line errors; atomic jsonl writing; the CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from megatron_t1.data.io import DataError, read_records, require_field, write_jsonl_atomic

ROOT = Path(__file__).resolve().parents[2]


def test_jsonl_round_trip_skips_blank_lines(tmp_path):
    recs = [{"a": 1, "s": "naïve ∑"}, {"a": 2, "nested": {"x": [1, 2]}}]
    path = tmp_path / "sub" / "r.jsonl"
    assert write_jsonl_atomic(path, recs) == 2
    path.write_text(path.read_text(encoding="utf-8") + "\n   \n", encoding="utf-8")
    assert list(read_records(path)) == [(1, recs[0]), (2, recs[1])]
    assert [p.name for p in path.parent.iterdir()] == ["r.jsonl"]  # no temporary file left behind


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "r.jsonl"
    write_jsonl_atomic(path, [{"a": 1}])

    def boom():
        yield {"a": 2}
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(path, boom())
    assert list(read_records(path)) == [(1, {"a": 1})]
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]


@pytest.mark.parametrize(
    "bad, match",
    [
        ('{"a": 1', r":2: invalid JSON"),
        ("[1, 2]", r":2: expected a JSON object, got list"),
        ("\udcff", r":2: not valid UTF-8"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad, match):
    path = tmp_path / "bad.jsonl"
    if bad == "\udcff":
        path.write_bytes(b'{"a": 1}\n\xff\xfe\n')
    else:
        path.write_text('{"a": 1}\n' + bad + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}{match}"):
        list(read_records(path))


def test_json_list_and_parquet(tmp_path):
    recs = [{"q": "x", "n": 1}, {"q": "y", "n": 2}]
    (tmp_path / "r.json").write_text(json.dumps(recs), encoding="utf-8")
    assert list(read_records(tmp_path / "r.json")) == [(1, recs[0]), (2, recs[1])]
    (tmp_path / "bad.json").write_text('{"q": 1}', encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON list"):
        list(read_records(tmp_path / "bad.json"))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "r.parquet")
    assert list(read_records(tmp_path / "r.parquet")) == [(1, recs[0]), (2, recs[1])]
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="junk.parquet: not a readable parquet file"):
        list(read_records(tmp_path / "junk.parquet"))


def test_missing_file_and_fields(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(read_records(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"^f.jsonl:7: missing field 'q'"):
        require_field("f.jsonl", 7, {"a": 1}, "q", str)
    with pytest.raises(DataError, match=r"^f.jsonl:7: field 'q' is int"):
        require_field("f.jsonl", 7, {"q": 1}, "q", str)
    assert require_field("f.jsonl", 7, {"q": "v"}, "q", str) == "v"


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_synthetic", ROOT / "tools" / "make_synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_make_synthetic_cli_is_deterministic_and_loads(tmp_path, capsys):
    from transformers import AutoTokenizer

    tool = _load_tool()
    argv = ["--n-train", "150", "--n-heldout", "40", "--n-rl", "60", "--seed", "3", "--vocab-size", "400"]
    assert tool.main(["--out", str(tmp_path / "a"), *argv]) == 0
    assert tool.main(["--out", str(tmp_path / "b"), *argv]) == 0
    assert tool.main(["--out", str(tmp_path / "b"), *argv]) == 0  # rewriting an existing folder works
    assert "150 SFT examples" in capsys.readouterr().out
    for name in ("sft_train.jsonl", "rl_prompts.jsonl", "heldout.jsonl", "tokenizer/tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "heldout.jsonl",
        "rl_prompts.jsonl",
        "sft_train.jsonl",
        "tokenizer",
    ]
    sft = [r for _, r in read_records(tmp_path / "a" / "sft_train.jsonl")]
    rl = [r for _, r in read_records(tmp_path / "a" / "rl_prompts.jsonl")]
    held = [r for _, r in read_records(tmp_path / "a" / "heldout.jsonl")]
    assert (len(sft), len(rl), len(held)) == (150, 60, 40)
    assert set(rl[0]) == set(held[0]) == {"id", "question", "answer"}
    held_q = {r["question"] for r in held}
    assert held_q.isdisjoint(r["question"] for r in rl)
    assert held_q.isdisjoint(r["messages"][0]["content"].split("\n")[0] for r in sft)
    tok = AutoTokenizer.from_pretrained(tmp_path / "a" / "tokenizer")
    assert tok.eos_token == "<|im_end|>" and len(tok) <= 400


def test_make_synthetic_help_has_an_example():
    tool = _load_tool()
    with pytest.raises(SystemExit):
        tool.parse_args(["--help"])
    assert "python tools/make_synthetic.py --out" in tool.__doc__


def test_streaming_jsonl_writer_appears_complete_or_not_at_all(tmp_path):
    from megatron_t1.data.io import open_jsonl_atomic

    path = tmp_path / "r.jsonl"
    with open_jsonl_atomic(path) as out:
        out.write([{"a": 1}])
        out.write([{"a": "é"}, {"a": 3}])
        assert not path.exists() and out.count == 3
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"a": "é"}\n{"a": 3}\n'
    assert path.stat().st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError), open_jsonl_atomic(path) as out:
        out.write([{"b": 1}])
        raise RuntimeError("stop")
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"] and path.read_text().count("\n") == 3
