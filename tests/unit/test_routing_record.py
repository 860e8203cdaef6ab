"""Recording MoE routing in the rollout engine and carrying it to the trainer's micro-batches.

The HF engine's record (hooks on transformers' routers during prefill and decode) must be the routing
a plain full forward of the same tokens gives; the record survives the all-gather's byte packing and
lands at each document's positions in both packed layouts, in the token order Megatron's routers use.
"""

from __future__ import annotations

import pytest
import torch

from megatron_t1.data.rl_batch import collate_rl_rank, plan_rl_packing
from megatron_t1.mcore.moe import RouteAgreement, router_token_routes
from megatron_t1.rollout.distributed import _pack, _unpack
from megatron_t1.rollout.engine import Completion, PromptCompletions, SamplingParams
from megatron_t1.rollout.hf_engine import HFEngine
from tests.unit.test_convert_ckpt import build_hf_model


class _Tok:
    """The few tokenizer methods the engine uses, over integer ids."""

    eos_token_id = 1
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def _full_forward_routes(model, ids: list[int]) -> torch.Tensor:
    """[T, layers, k] sorted top-k experts of every token from one plain forward (the reference)."""
    k = model.config.num_experts_per_tok
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_router_logits=True)
    return torch.stack([lg.topk(k, dim=-1).indices.sort(-1).values for lg in out.router_logits], dim=1)


@pytest.fixture(scope="module")
def generated():
    model = build_hf_model("qwen3_moe")
    engine = HFEngine(model, _Tok(), record_routing=True)
    prompts = [[5, 9, 13, 22, 7], [40, 41, 3]]  # different lengths: the prefill is left-padded
    params = SamplingParams(temperature=1.0, max_tokens=12)
    return model, prompts, engine.generate(prompts, 3, params, seeds=[3, 4])


def test_recorded_routing_is_that_of_a_full_forward(generated):
    model, prompts, gens = generated
    layers, k = model.config.num_hidden_layers, model.config.num_experts_per_tok
    same = total = 0
    for p, g in zip(prompts, gens):
        assert g.routed_experts.shape == (len(p), layers, k) and g.routed_experts.dtype == torch.int16
        for c in g.completions:
            assert c.routed_experts.shape == (len(c.token_ids), layers, k)
            assert bool((c.routed_experts[-1] == -1).all())  # the last token is never fed to the model
            rec = torch.cat([g.routed_experts, c.routed_experts[:-1]]).long().sort(-1).values
            ref = _full_forward_routes(model, p + c.token_ids)[:-1]
            eq = (rec == ref).all(-1)
            same, total = same + int(eq.sum()), total + eq.numel()
    # KV-cached decoding vs one forward: float rounding may flip a near-tie, nothing more
    assert same / total >= 0.99, same / total


def test_a_wrong_record_is_told_apart(generated):
    """Negative control for the comparison above: another sample's routing does not pass."""
    model, prompts, gens = generated
    g = gens[0]
    a, b = g.completions[0], g.completions[1]
    n = min(len(a.token_ids), len(b.token_ids)) - 1
    assert a.token_ids[:n] != b.token_ids[:n]
    rec = torch.cat([g.routed_experts, b.routed_experts[:n]]).long().sort(-1).values
    ref = _full_forward_routes(model, prompts[0] + a.token_ids)[: len(prompts[0]) + n]
    eq = (rec[len(prompts[0]) :] == ref[len(prompts[0]) :]).all(-1).float().mean()
    assert eq < 0.9


def test_dense_model_refuses_recording():
    with pytest.raises(ValueError, match="no MoE router"):
        HFEngine(build_hf_model("qwen3"), _Tok(), record_routing=True)


def test_routing_survives_the_gather_packing():
    routes = torch.randint(-1, 8, (4, 2, 2), dtype=torch.int16)
    prompt_routes = torch.randint(0, 8, (3, 2, 2), dtype=torch.int16)
    first = Completion([4, 5, 6, 7], "x", [0.0] * 4, "stop", routes)
    gens = [
        PromptCompletions([1, 2, 3], [first], prompt_routes),
        PromptCompletions([9], [Completion([8], "y", [-1.0], "length")]),
    ]
    back = _unpack(_pack(gens))
    assert torch.equal(back[0].routed_experts, prompt_routes)
    assert torch.equal(back[0].completions[0].routed_experts, routes)
    assert back[1].routed_experts is None and back[1].completions[0].routed_experts is None


def test_routing_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match=r"response routing must be an integer \[2, layers, k\]"):
        Completion([4, 5], "x", [0.0, 0.0], "stop", torch.zeros(3, 2, 2, dtype=torch.int16))


@pytest.mark.parametrize("layout", ["thd", "mask"])
def test_collate_places_routing_at_the_documents_tokens(layout):
    docs = [[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14]]
    plens = [2, 1, 2]
    routes = [torch.full((len(d), 2, 2), 10 * (i + 1), dtype=torch.int16) for i, d in enumerate(docs)]
    for i, r in enumerate(routes):
        r[:, :, 1] = torch.arange(len(docs[i]), dtype=torch.int16)[:, None]  # position in the document
    plan = plan_rl_packing([len(d) for d in docs], seq_len=8, dp=1, micro_batch_size=2)
    mbs = collate_rl_rank(plan, 0, docs, plens, pad_id=0, layout=layout, doc_routes=routes)
    seen = 0
    for mb in mbs:
        re, tok = mb["routed_experts"], mb["tokens"]
        assert re.shape == (*tok.shape, 2, 2)
        for pos in zip(*torch.nonzero(tok, as_tuple=True)):  # every real token (ids are >= 3)
            t = int(tok[pos])
            d = next(i for i, doc in enumerate(docs) if t in doc)
            assert int(re[pos][0, 0]) == 10 * (d + 1) and int(re[pos][0, 1]) == docs[d].index(t)
            seen += 1
        assert bool((re[tok == 0] == -1).all())  # padding: nothing recorded
    assert seen == sum(len(d) for d in docs)


def test_router_token_order_is_sequence_major():
    """Megatron routes hidden states [s, b, H] flattened: row i * b + j is position i of row j."""
    b, s = 3, 4
    routes = torch.zeros(b, s, 1, 2, dtype=torch.int16)
    for j in range(b):
        for i in range(s):
            routes[j, i, 0] = torch.tensor([j, i])
    flat = router_token_routes(routes, sequence_parallel=False)
    for j in range(b):
        for i in range(s):
            assert flat[i * b + j, 0].tolist() == [j, i]


def test_route_agreement_counts_sets_and_skips_unrecorded():
    agree = RouteAgreement()
    own = torch.tensor([[0, 1], [2, 3], [1, 0], [0, 3]])
    rec = torch.tensor([[1, 0], [2, 1], [-1, -1], [0, 3]])  # same set, different, unrecorded, same
    agree.add(own, rec)
    assert agree.metrics() == {"moe/route_agreement": pytest.approx(2 / 3)}
    assert RouteAgreement().metrics() == {}


_MOE = ["model.arch=qwen3_moe", "model.num_experts=4", "model.moe_router_topk=2"]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["loss.routing_replay=true"], "needs an MoE policy"),
        (["rollout.record_routing=true"], "needs an MoE policy"),
        ([*_MOE, "loss.routing_replay=true", "rollout.engine=vllm"], "needs rollout.engine=hf"),
        ([*_MOE, "loss.routing_replay=true", "model.recompute=full"], "model.recompute=full"),
    ],
)
def test_routing_config_is_checked(sets, message):
    from megatron_t1.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, sets).validate()


def test_routing_replay_implies_recording():
    from megatron_t1.config import load_config

    cfg = load_config(None, [*_MOE, "loss.routing_replay=true"])
    cfg.validate()
    assert cfg.records_routing
    assert not load_config(None, _MOE).records_routing


def test_checkpoint_with_other_experts_is_refused():
    from dataclasses import asdict

    from megatron_t1.config import ConfigError, load_config
    from megatron_t1.mcore.checkpoint import check_compatible

    cfg = load_config(None, _MOE)
    meta = {"model": asdict(cfg.model)}
    check_compatible(meta, cfg, "ckpt")  # the same model passes
    for key, value, message in [
        ("num_experts", 8, "num_experts=8"),
        ("num_experts", None, "num_experts=None"),
        ("moe_ffn_hidden_size", 7, "width 7"),
    ]:
        bad = {"model": {**meta["model"], key: value}}
        with pytest.raises(ConfigError, match=message):
            check_compatible(bad, cfg, "ckpt")
