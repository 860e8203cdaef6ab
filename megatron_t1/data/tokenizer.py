"""A small byte-level BPE tokenizer for the CPU demo, trained offline and saved as an HF folder.

Pre-tokenisation isolates every digit (``Digits(individual_digits=True)`` before the GPT-2 style
byte-level split), so numbers are always one token per digit: arithmetic then has a fixed,
position-aligned representation, which matters a lot for a tiny model. Chat uses ChatML
(``<|im_start|>role\\n ... <|im_end|>\\n``, as Qwen2.5): ``<|im_end|>`` is EOS, ``<|endoftext|>``
is padding. ``<think>`` / ``</think>`` are single added tokens that are *not* special, so
``decode(skip_special_tokens=True)`` keeps them (the thinking must stay parseable).

The folder written by :func:`train_tokenizer` loads offline with
``transformers.AutoTokenizer.from_pretrained(out_dir)`` and with vLLM.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
THINK_TOKENS = ("<think>", "</think>")

# ChatML. An assistant turn is "<|im_start|>assistant\n{content}<|im_end|>\n"; the generation
# prompt is "<|im_start|>assistant\n". No default system message (a system turn is rendered only
# when the messages contain one).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def chat_corpus(examples: Iterable[dict]) -> Iterator[str]:
    """Training texts for :func:`train_tokenizer` from chat records: each role name and content.

    The ChatML marker strings are left out: they are special tokens, and learning merges for
    their characters would waste vocabulary.
    """
    for ex in examples:
        for m in ex["messages"]:
            yield m["role"] + "\n" + m["content"]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike | None = None):
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        texts: the training corpus (e.g. rendered SFT conversations); a few thousand lines train
            in well under a second.
        vocab_size: the target vocabulary size, special and added tokens included (>= 300: the
            256 byte symbols plus the special tokens must fit).
        out_dir: if given, ``save_pretrained(out_dir)`` (tokenizer.json, tokenizer_config.json with
            the chat template, special_tokens_map.json).

    Returns:
        The ``transformers.PreTrainedTokenizerFast`` (eos ``<|im_end|>``, pad ``<|endoftext|>``,
        no BOS, ``chat_template`` set).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size}: need >= 300 (256 bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
