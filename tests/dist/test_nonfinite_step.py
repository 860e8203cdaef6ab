"""A non-finite loss on ONE data-parallel rank skips the update on every rank: weights and Adam's state
stay bitwise what they were, the scheduler does not advance; the next finite step trains normally.
N skipped steps in a row stop the run (SkipGuard)."""

from __future__ import annotations

import pytest

from megatron_t1.errors import TrainingError
from tests.dist.harness import run_ranks

pytestmark = pytest.mark.dist


def _worker(rank, world, tmp):
    import torch

    from megatron_t1.config import config_from_dict
    from megatron_t1.mcore.forward import sft_forward_step
    from megatron_t1.mcore.model import build_model, unwrap
    from megatron_t1.mcore.parallel import destroy_parallel, init_parallel
    from megatron_t1.mcore.train_step import build_optimizer, train_step

    cfg = config_from_dict(
        {
            "model": {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4},
            "data": {"seq_length": 16, "micro_batch_size": 1, "global_batch_size": 2},
            "optim": {"lr": 1e-2, "lr_warmup_steps": 0, "lr_decay_style": "linear"},
            "run": {"train_steps": 10, "device": "cpu", "output_dir": tmp},
        }
    )
    init_parallel(cfg.parallel, seed=5, device="cpu")
    chunks = build_model(cfg)
    opt, sched = build_optimizer(cfg, chunks)
    g = torch.Generator().manual_seed(rank)
    toks = torch.randint(0, cfg.model.vocab_size, (1, 17), generator=g)
    mb = {
        "tokens": toks[:, :-1],
        "labels": toks[:, 1:],
        "loss_mask": torch.ones(1, 16),
        "position_ids": torch.arange(16)[None],
        "attention_mask": None,
    }

    def snapshot():
        params = [p.detach().clone() for p in unwrap(chunks[0]).parameters()]
        state = [v.clone() for s in opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return params, state

    def poisoned_forward_step(data_iterator, model):
        # this rank's loss times NaN: NaN gradients here, finite ones on the other rank
        out, loss_fn = sft_forward_step(data_iterator, model)

        def nan_loss(output):
            loss, n, metrics = loss_fn(output)
            return loss * float("nan"), n, metrics

        return out, nan_loss

    def step(poison: bool):
        fs = poisoned_forward_step if poison else sft_forward_step
        return train_step(chunks, opt, sched, fs, [dict(mb)], seq_length=16, micro_batch_size=1)

    first = step(False)  # Adam state exists from here on
    lr_before = opt.param_groups[0]["lr"]
    before = snapshot()
    bad = step(poison=rank == 1)
    after = snapshot()
    same = all(torch.equal(a, b) for a, b in zip(before[0] + before[1], after[0] + after[1]))
    lr_same = opt.param_groups[0]["lr"] == lr_before
    good = step(False)
    moved = any(not torch.equal(a, b) for a, b in zip(after[0], snapshot()[0]))
    destroy_parallel()
    return {
        "first_skipped": first.skipped,
        "bad_skipped": bad.skipped,
        "unchanged": same,
        "lr_same": lr_same,
        "good_skipped": good.skipped,
        "moved": moved,
        "grad_norm": good.grad_norm,
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_worker, 2, args=(str(tmp_path_factory.mktemp("nan")),), timeout=180)


def test_nan_on_one_rank_skips_everywhere_and_leaves_state(results):
    for r in results:
        assert not r["first_skipped"]
        assert r["bad_skipped"], r
        assert r["unchanged"] and r["lr_same"], r
        assert not r["good_skipped"] and r["moved"] and r["grad_norm"] > 0, r


def test_skip_guard_stops_after_n_in_a_row():
    from megatron_t1.mcore.train_step import SkipGuard

    g = SkipGuard(3)
    for step, skipped in enumerate([True, True, False, True, True], start=1):
        g.update(skipped, step)  # never 3 in a row
    with pytest.raises(TrainingError, match="3 steps in a row.*run.max_skipped_steps=3"):
        g.update(True, 6)
