"""Rollouts sharded over every rank (2 real gloo ranks, the HF engine, the real RL loop in-process).

* Each rank's engine samples half of a step's prompts, and the gathered completions (tokens,
  sampler log-probs, finish reasons) equal those of one engine on the same two ranks and of a plain
  single-process generate.
* The RL loop with one engine per rank (DP=2, and a TP=2 trainer) gives step 1 exactly as the loop
  with one engine for both ranks: same rewards, loss, KL and held-out evaluation (dealt over the
  engines too); two steps with finite metrics and every engine in parity.
* An engine that raises on rank 1 only ends both ranks with an error naming rank 1; one that hangs is
  named by rank 0 after ``rollout.timeout_minutes`` and no rank waits forever.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist.harness import run_ranks
from tests.e2e.test_rl_cli import data  # noqa: F401  (a fixture: the tokenizer and 16 prompts)

pytestmark = [pytest.mark.dist, pytest.mark.slow]

PROMPTS = [[5, 9, 11], list(range(30, 52)), [7, 8, 9, 10], list(range(100, 112)), [3, 4], [60, 61, 62]]


def _tiny_hf(tok_dir: str):
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from megatron_t1.rollout.hf_engine import HFEngine

    torch.manual_seed(0)  # the same weights on every rank
    cfg = Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
    )  # fmt: skip
    return HFEngine(Qwen2ForCausalLM(cfg).eval(), AutoTokenizer.from_pretrained(tok_dir))


def _generate_worker(rank, world, tok_dir):
    from datetime import timedelta

    import torch.distributed as dist

    from megatron_t1.rollout.distributed import DistributedRollout
    from megatron_t1.rollout.engine import SamplingParams, sample_seed
    from megatron_t1.rollout.placement import place_engines

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=90))
    engine = _tiny_hf(tok_dir)
    params = SamplingParams(temperature=1.2, max_tokens=20)
    seeds = [sample_seed(1234, 1, i) for i in range(len(PROMPTS))]
    local = engine.generate(PROMPTS, 4, params, seeds=seeds)  # one engine, no distribution
    out = {"local": local}
    for size in (1, 2):  # ranks per engine: 2 engines of 1 rank, then 1 engine (on rank 0) of 2
        pl = place_engines(world, world, engines_per_node=None, ranks_per_engine=size)
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=60))
        mine = engine if pl.is_leader(rank) else None
        r = DistributedRollout(pl, rank, mine, group=group, timeout_s=60)
        out[f"engines{pl.num_engines}"] = r.generate(PROMPTS, 4, params, seeds=seeds)
        out[f"generated{pl.num_engines}"] = r.generated
        out[f"stats{pl.num_engines}"] = r.stats
    dist.destroy_process_group()
    return out


def _key(gens):
    return [[(c.token_ids, c.finish_reason, c.text) for c in g.completions] for g in gens]


def test_each_rank_samples_half_and_the_gather_is_engine_count_independent(data):  # noqa: F811
    import pytest as _pytest

    res = run_ranks(_generate_worker, 2, args=(str(data / "tok"),), timeout=180)
    assert res[0]["generated2"] == [0, 2, 4] and res[1]["generated2"] == [1, 3, 5]
    assert res[0]["generated1"] == list(range(6)) and res[1]["generated1"] == []
    local = res[0]["local"]
    for r in res:
        for k in ("engines1", "engines2"):
            assert [g.prompt_token_ids for g in r[k]] == PROMPTS
            assert _key(r[k]) == _key(local), k
            for g, ref in zip(r[k], local):
                for c, cr in zip(g.completions, ref.completions):
                    assert c.logprobs == _pytest.approx(cr.logprobs, abs=1e-5)  # batched fp32
        assert r["stats2"]["rollout/engines"] == 2.0 and r["stats1"]["rollout/engines"] == 1.0
        tokens = sum(len(c.token_ids) for g in local for c in g.completions)
        assert r["stats2"]["rollout/tokens"] == r["stats1"]["rollout/tokens"] == tokens


# -- the RL loop ------------------------------------------------------------------------------------


def _cfg(data: str, out: str, name: str, *extra: str):
    from megatron_t1.config import load_config

    return load_config(
        None,
        [
            "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
            "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=512",
            "model.max_position_embeddings=256", f"model.tokenizer={data}/tok",
            f"data.train_path={data}/prompts.jsonl", "data.seq_length=96", "data.micro_batch_size=4",
            "data.global_batch_size=8", "optim.lr=1e-3", "optim.lr_decay_style=constant",
            "rollout.prompts_per_step=4", "rollout.n_samples=4", "rollout.max_new_tokens=24",
            "rollout.temperature=1.2", "reward.num_workers=1", "loss.entropy_coef=0.01", "anchor.ema=0.9",
            f"run.name={name}", f"run.output_dir={out}", "run.train_steps=2", "run.device=cpu",
            "log.progress_bar=false", "log.tensorboard=false", f"eval.heldout_path={data}/prompts.jsonl",
            "eval.heldout_size=4", "eval.eval_every=1", "eval.eval_at_start=false", "eval.max_new_tokens=8", *extra,
        ],
    )  # fmt: skip


def _metrics(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _rl_worker(rank, world, data, out):
    from megatron_t1.mcore.parallel import destroy_parallel
    from megatron_t1.train.rl import run_rl

    runs = {
        "two": [],  # DP=2, an engine per rank
        "one": ["rollout.vllm_tensor_parallel_size=2"],  # DP=2, one engine for both ranks (on rank 0)
        "tp2": ["parallel.tensor_model_parallel_size=2"],  # TP=2 trainer, an engine per rank
    }
    for name, extra in runs.items():
        run_rl(_cfg(data, out, name, *extra))
    destroy_parallel()
    return True


def test_rl_loop_with_an_engine_per_rank_equals_one_engine(data, tmp_path):  # noqa: F811
    run_ranks(_rl_worker, 2, args=(str(data), str(tmp_path)), timeout=400)
    m = {name: _metrics(tmp_path / name) for name in ("two", "one", "tp2")}
    for name, engines in (("two", 2), ("one", 1), ("tp2", 2)):
        assert sorted(m[name]) == [1, 2], name
        for row in m[name].values():
            assert row["rollout/engines"] == engines
            assert row["sync/parity_mean_abs"] < 1e-4 and row["sync/engines"] == engines
            for key in ("loss", "reward_mean", "kl_anchor", "m/entropy", "grad_norm", "mismatch_mean"):
                assert row[key] == row[key] and abs(row[key]) < 1e6, (name, key)  # finite
            assert row["sync/bytes"] > 0 and row["sync/gb_per_s"] > 0
            # the step's rollout numbers, not those of the held-out evaluation that followed it
            assert row["rollout/tokens"] == pytest.approx(row["response_len"] * 4 * 4), (name, row)
    # Same rollouts whatever the number of engines: step 1 is the same step (and so is step 2 at DP=2).
    for step in (1, 2):
        for key in ("reward_mean", "accuracy", "penalty_rate", "response_len", "loss", "kl_anchor",
                    "heldout_accuracy", "heldout_len"):  # fmt: skip
            assert m["two"][step][key] == m["one"][step][key], (step, key)
    for key in ("reward_mean", "response_len", "truncated_rate"):
        assert m["tp2"][1][key] == m["two"][1][key], key
    assert m["tp2"][1]["loss"] == pytest.approx(m["two"][1]["loss"], rel=1e-4, abs=1e-6)


# -- failures ---------------------------------------------------------------------------------------


def _fault_worker(rank, world, data, out, fault):
    import time

    from megatron_t1.rollout.hf_engine import HFEngine
    from megatron_t1.train.rl import run_rl

    if rank == 1:
        real = HFEngine.generate

        def broken(self, prompts, n, params, *, seeds=None):
            if fault == "raise":
                raise RuntimeError("injected fault in rank 1's engine")
            time.sleep(12)  # longer than rollout.timeout_minutes below
            return real(self, prompts, n, params, seeds=seeds)

        HFEngine.generate = broken
    t = time.perf_counter()
    try:
        run_rl(_cfg(data, out, fault, "rollout.timeout_minutes=0.05"))
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t}
    return {"error": None}


@pytest.mark.parametrize("fault", ["raise", "hang"])
def test_an_engine_failing_on_rank_1_stops_both_ranks_naming_it(data, tmp_path, fault):  # noqa: F811
    res = run_ranks(_fault_worker, 2, args=(str(data), str(tmp_path), fault), timeout=240)
    for rank, r in enumerate(res):
        assert r["error"] is not None, f"rank {rank} ended without an error"
    if fault == "raise":
        for r in res:  # the same message on both ranks
            assert r["error"].startswith("EngineError: rollout engine failed: engine 1 (rank 1, node 0)")
            assert "injected fault in rank 1's engine" in r["error"]
    else:
        # Rank 0 waited rollout.timeout_minutes (3 s), not forever, and names the rank that did not come.
        assert res[0]["error"].startswith("EngineError: rollout: not every rank finished within")
        assert "Ranks 1 failed to pass" in res[0]["error"], res[0]["error"]
        assert res[0]["seconds"] < 60  # the whole run: start-up, then 3 s of waiting
