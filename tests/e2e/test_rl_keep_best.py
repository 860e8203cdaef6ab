"""Model selection in the RL trainer (``checkpoint.keep_best``): every held-out evaluation saves a
checkpoint, the best one is marked, survives ``keep_last`` pruning, outlives a stop and restart (the
evaluations travel in the checkpoint), and is exported as ``hf_best/`` with its own weights.

The run is real (tiny random policy, Megatron-Core on CPU, in this process); only the held-out
accuracies are scripted, since a random policy scores 0 everywhere and could not tell the best step
from the last one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SCRIPTED = [0.30, 0.50, 0.40]  # held-out accuracy at steps 1, 2, 3: the best (step 2) is not the last


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megatron_t1.data.io import write_jsonl_atomic
    from megatron_t1.data.synthetic import make_problems, make_sft_examples
    from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer

    d = tmp_path_factory.mktemp("bestdata")
    train_tokenizer(chat_corpus(make_sft_examples(200, seed=5)), 512, d / "tok")
    rows = [{"question": p.question, "answer": p.answer} for p in make_problems(8, seed=5, split="train")]
    write_jsonl_atomic(d / "prompts.jsonl", rows)
    write_jsonl_atomic(d / "val.jsonl", rows[:2])
    return d


def _cfg(data: Path, out: Path, *extra: str):
    from megatron_t1.config import load_config

    return load_config(
        None,
        [
            "model.num_layers=2",
            "model.hidden_size=64",
            "model.ffn_hidden_size=128",
            "model.num_attention_heads=4",
            "model.num_query_groups=2",
            "model.vocab_size=512",
            "model.max_position_embeddings=256",
            f"model.tokenizer={data / 'tok'}",
            f"data.train_path={data / 'prompts.jsonl'}",
            "data.seq_length=96",
            "data.micro_batch_size=4",
            "data.global_batch_size=4",
            "rollout.prompts_per_step=2",
            "rollout.n_samples=2",
            "rollout.max_new_tokens=16",
            "reward.num_workers=1",
            "run.name=r",
            f"run.output_dir={out}",
            "run.train_steps=3",
            "run.device=cpu",
            "log.progress_bar=false",
            "log.tensorboard=false",
            f"eval.heldout_path={data / 'val.jsonl'}",
            "eval.max_new_tokens=8",
            "eval.eval_every=1",
            "eval.eval_at_start=false",
            "checkpoint.keep_best=true",
            "checkpoint.keep_last=1",
            *extra,
        ],
    )


def _scripted_evaluate(monkeypatch, calls: list[int]):
    from megatron_t1.rollout.distributed import DistributedRollout

    def fake(self, heldout, cfg, tok):
        acc = SCRIPTED[len(calls)]
        calls.append(1)
        return {"heldout_accuracy": acc, "heldout_stderr": 0.0, "heldout_len": 1.0}

    monkeypatch.setattr(DistributedRollout, "evaluate", fake)


_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _run(cfg) -> dict:
    """run_rl in this process as a world of one. It must leave no rendezvous variables behind (a world
    of one uses an in-memory store), or later tests' subprocesses (torchrun, CLI runs) inherit a used
    port; a launcher's variables in the test's own environment are set aside meanwhile."""
    from megatron_t1.mcore.parallel import destroy_parallel
    from megatron_t1.train.rl import run_rl

    saved = {k: os.environ.pop(k, None) for k in _DIST_ENV}
    try:
        return run_rl(cfg)
    finally:
        destroy_parallel()
        left = {k: os.environ[k] for k in _DIST_ENV if k in os.environ}
        os.environ.update({k: v for k, v in saved.items() if v is not None})
        assert not left, f"a world of one left rendezvous variables set: {left}"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(f)
    return out


def test_best_checkpoint_is_kept_resumed_and_exported(data, tmp_path, monkeypatch):
    from megatron_t1.mcore.checkpoint import best_checkpoint
    from megatron_t1.train.rl import export_hf

    calls: list[int] = []
    _scripted_evaluate(monkeypatch, calls)
    # Stop after step 2 and restart with the same config: the selection must span both processes.
    first = _run(_cfg(data, tmp_path, "run.exit_interval=2"))
    assert first["hf_dir"] is None and len(calls) == 2
    out = _run(_cfg(data, tmp_path))
    assert len(calls) == 3
    assert out["evals"] == {1: 0.30, 2: 0.50, 3: 0.40}
    assert out["best_step"] == 2

    ckpts = tmp_path / "r" / "checkpoints"
    # keep_last=1 keeps the latest, and the best besides it
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000002", "step_0000003"]
    assert best_checkpoint(ckpts) == ckpts / "step_0000002"
    metrics = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("heldout_best_step") for m in metrics] == [1.0, 2.0, 2.0]

    best, final = _weights(tmp_path / "r" / "hf_best"), _weights(tmp_path / "r" / "hf")
    ref = _weights(export_hf(_cfg(data, tmp_path), ckpts / "step_0000002", tmp_path / "ref_hf"))
    assert best.keys() == final.keys() == ref.keys()
    assert all(torch.equal(best[k], ref[k]) for k in ref)
    assert any(not torch.equal(best[k], final[k]) for k in ref)  # step 3 trained on: not the same policy


def test_best_is_the_last_step_links_the_final_export(data, tmp_path, monkeypatch):
    from megatron_t1.rollout.distributed import DistributedRollout

    monkeypatch.setattr(
        DistributedRollout,
        "evaluate",
        lambda *a: {"heldout_accuracy": 0.5, "heldout_stderr": 0.0, "heldout_len": 1.0},
    )
    out = _run(_cfg(data, tmp_path, "run.train_steps=2"))
    assert out["best_step"] == 2  # a tie goes to the later step
    best, final = tmp_path / "r" / "hf_best", tmp_path / "r" / "hf"
    names = sorted(p.name for p in final.iterdir())
    assert sorted(p.name for p in best.iterdir()) == names
    assert all((best / n).read_bytes() == (final / n).read_bytes() for n in names)


def test_keep_best_without_evaluations_is_a_config_error(data, tmp_path):
    from megatron_t1.config import ConfigError

    with pytest.raises(ConfigError, match="keep_best.*eval.eval_every"):
        _run(_cfg(data, tmp_path, "eval.eval_every=0"))


def test_best_step_prefers_the_later_step_on_ties():
    from megatron_t1.train.rl import best_step

    assert best_step({}) is None
    assert best_step({5: 0.3, 10: 0.4, 15: 0.4, 20: 0.2}) == 15
    assert best_step({5: 0.5, 10: 0.4}) == 5


def test_prune_never_deletes_the_protected_step(tmp_path):
    from megatron_t1.mcore.checkpoint import _prune

    for s in (1, 2, 3, 4):
        (tmp_path / f"step_{s:07d}").mkdir()
    (tmp_path / "step_0000005.tmp").mkdir()
    _prune(tmp_path, keep=1, protect="step_0000002")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002", "step_0000004", "step_0000005.tmp"]
