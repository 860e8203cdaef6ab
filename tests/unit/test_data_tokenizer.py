"""The demo tokenizer: round trip, one token per digit, chat template, offline save/load."""

from __future__ import annotations

import pytest

from megatron_t1.data import synthetic as syn
from megatron_t1.data.tokenizer import CHAT_TEMPLATE, chat_corpus, train_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    examples = syn.make_sft_examples(300, 0, n_operands=(2, 4), digits=(1, 3))
    train_tokenizer(chat_corpus(examples), 400, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


TEXTS = [
    "Compute 47 + 385 - 129.",
    "check: 303 + 129 = 432, correct\nThe answer is \\boxed{303}.",
    "unicode: naïve café 数学 ∑ 🙂, tabs\tand  spaces\n\n",
    "<think>\n1 + 2 = 3\n</think>\n",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_every_digit_is_its_own_token(tok):
    text = "12345 + 67890 = 80235, x1y22 3.14 0000"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert "".join(pieces) == text
    for piece in pieces:
        if any(c.isdigit() for c in piece):
            assert len(piece) == 1, f"token {piece!r} merges a digit with something else"
    assert sum(len(p) == 1 and p.isdigit() for p in pieces) == sum(c.isdigit() for c in text)


def test_special_and_thinking_tokens(tok):
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id != tok.pad_token_id
    assert tok.bos_token is None
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    ids = tok("<think>\n7\n</think><|im_end|>", add_special_tokens=False)["input_ids"]
    # <think> tags are not special: they survive skip_special_tokens (the thinking stays parseable)
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\n7\n</think>"
    assert len(tok) <= 400


def test_chat_template_is_chatml(tok):
    msgs = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nA.<|im_end|>\n"
    gen = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert gen == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.chat_template == CHAT_TEMPLATE


def test_saved_folder_loads_offline_and_matches(tok_dir, tok, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    for text in TEXTS:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.apply_chat_template(syn.prompt_messages("Compute 1 + 2."), tokenize=False) == (
        tok.apply_chat_template(syn.prompt_messages("Compute 1 + 2."), tokenize=False)
    )


def test_vocab_size_is_validated(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b c"], 100)
