"""SFT formatting: only assistant tokens are trained; the reader names file:line on bad input."""

from __future__ import annotations

import json

import pytest

from megatron_t1.data import synthetic as syn
from megatron_t1.data.io import DataError
from megatron_t1.data.sft import SFTDataset, tokenize_chat
from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    examples = syn.make_sft_examples(300, 0, n_operands=(2, 4), digits=(1, 3))
    return train_tokenizer(chat_corpus(examples), 400)


def _trained_text(tok, ex) -> str:
    ids, mask = tokenize_chat(ex, tok)
    return tok.decode([i for i, m in zip(ids, mask) if m])


def _runs(mask: list[int]) -> int:
    """Number of maximal runs of 1s."""
    return sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))


def test_only_the_assistant_turn_and_its_end_token_are_trained(tok):
    ex = syn.make_sft_examples(20, 1, truncated_fraction=0.0)[0]
    ids, mask = tokenize_chat(ex, tok)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    assert _trained_text(tok, ex) == ex["messages"][1]["content"] + "<|im_end|>"
    assert _runs(mask) == 1
    # the prompt (everything before the assistant content) is exactly the generation prompt, untrained
    prompt = tok.apply_chat_template(ex["messages"][:1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ids[:n_prompt] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert not any(mask[:n_prompt]) and mask[n_prompt] == 1
    last = max(i for i, m in enumerate(mask) if m)
    assert ids[last] == tok.eos_token_id  # <|im_end|> of the assistant turn is a target
    assert (
        ids
        == tok(tok.apply_chat_template(ex["messages"], tokenize=False), add_special_tokens=False)["input_ids"]
    )


def test_multi_turn_and_system(tok):
    msgs = [
        {"role": "system", "content": "sys text"},
        {"role": "user", "content": "Compute 1 + 2."},
        {"role": "assistant", "content": "first 3"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "second 3"},
    ]
    ids, mask = tokenize_chat({"messages": msgs}, tok)
    assert _runs(mask) == 2
    assert _trained_text(tok, {"messages": msgs}) == "first 3<|im_end|>second 3<|im_end|>"


def test_masked_prefix_of_truncated_thinking(tok):
    ex = next(
        e
        for e in syn.make_sft_examples(200, 2, truncated_fraction=0.5)
        if "mask_prefix_chars" in e["messages"][1]
    )
    assert _trained_text(tok, ex) == syn.answer_line(ex["answer"]) + "<|im_end|>"
    bad = {"messages": [ex["messages"][0], dict(ex["messages"][1], mask_prefix_chars=10**6)]}
    with pytest.raises(ValueError, match="mask_prefix_chars"):
        tokenize_chat(bad, tok)


def test_max_len_truncates_from_the_right(tok):
    ex = syn.make_sft_examples(5, 3)[0]
    full_ids, full_mask = tokenize_chat(ex, tok)
    ids, mask = tokenize_chat(ex, tok, max_len=20)
    assert ids == full_ids[:20] and mask == full_mask[:20]


def test_non_prefix_stable_template_is_refused(tok):
    import copy

    weird = copy.copy(tok)
    # renders the number of messages first: a prefix of the conversation is not a prefix of the whole
    weird.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="prefix-stable"):
        tokenize_chat({"messages": syn.make_sft_examples(1, 0)[0]["messages"]}, weird)


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty"),
        ([{"role": "user", "content": "q"}], "no assistant"),
        ([{"role": "user"}, {"role": "assistant", "content": "a"}], "message 0"),
        ([{"role": "assistant", "content": "a"}], "first"),
    ],
)
def test_bad_messages(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tokenize_chat({"messages": messages}, tok)


def _write_jsonl(path, records, bad_line: str | None = None, at: int = 2):
    lines = [json.dumps(r) for r in records]
    if bad_line is not None:
        lines.insert(at, bad_line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_dataset_reads_jsonl_and_parquet_identically(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    examples = syn.make_sft_examples(30, 4, truncated_fraction=0.3)
    _write_jsonl(tmp_path / "d.jsonl", examples)
    pq.write_table(pa.Table.from_pylist(examples), tmp_path / "d.parquet")
    a = SFTDataset(tmp_path / "d.jsonl", tok, max_len=512).load()
    b = SFTDataset(tmp_path / "d.parquet", tok, max_len=512).load()
    assert a == b == [tokenize_chat(e, tok, 512) for e in examples]


def test_corrupt_line_names_file_and_line(tok, tmp_path):
    examples = syn.make_sft_examples(5, 5)
    path = tmp_path / "sft.jsonl"
    _write_jsonl(path, examples, bad_line='{"messages": [', at=2)  # file line 3
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON"):
        SFTDataset(path, tok, max_len=512).load()
    msg = None
    try:
        SFTDataset(path, tok, max_len=512).load()
    except DataError as e:
        msg = str(e)
    assert msg is not None and "\n" not in msg  # one line


def test_bad_records_name_file_and_line(tok, tmp_path):
    good = syn.make_sft_examples(3, 6)
    path = tmp_path / "a.jsonl"
    _write_jsonl(path, good + [{"conversation": []}])
    with pytest.raises(DataError, match=rf"^{path}:4: missing field 'messages'"):
        SFTDataset(path, tok, max_len=512).load()
    _write_jsonl(path, good[:1] + [{"messages": [{"role": "user", "content": 3}]}])
    with pytest.raises(DataError, match=rf"^{path}:2: bad 'messages'"):
        SFTDataset(path, tok, max_len=512).load()
    _write_jsonl(path, good[:1] + [{"messages": "hi"}])
    with pytest.raises(DataError, match=rf"^{path}:2: field 'messages' is str"):
        SFTDataset(path, tok, max_len=512).load()


def test_dataset_counts_truncated_examples(tok, tmp_path):
    examples = syn.make_sft_examples(10, 7, truncated_fraction=0.0)
    _write_jsonl(tmp_path / "d.jsonl", examples)
    ds = SFTDataset(tmp_path / "d.jsonl", tok, max_len=60)
    with pytest.warns(UserWarning, match="truncated to 60 tokens"):
        rows = ds.load()
    assert all(len(r.input_ids) <= 60 for r in rows)
    assert ds.n_truncated == 10 and ds.n_skipped == 0
