"""Rollout placement (no GPUs, no processes): the engines of the example configs over their jobs,
the one-line errors for placements that do not tile a node, and dealing prompts to engines."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_t1.config import ConfigError, load_config
from megatron_t1.rollout.placement import check_nodes, deal, merge, place_engines, single_engine

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str, world: int, per_node: int):
    ro = load_config(EXAMPLES / name / "rl.yaml").rollout
    return place_engines(
        world, per_node, engines_per_node=ro.engines_per_node, ranks_per_engine=ro.vllm_tensor_parallel_size
    )


def test_32b_example_on_4_nodes_of_8_gpus():
    pl = _example("qwen2.5_32b", 32, 8)
    assert pl.num_engines == 8 and pl.ranks_per_engine == 4 and pl.engines_per_node == 2
    assert pl.groups == tuple(tuple(range(s, s + 4)) for s in range(0, 32, 4))
    for e, ranks in enumerate(pl.groups):
        assert len({pl.node_of(r) for r in ranks}) == 1, f"engine {e} spans nodes"
        assert all(pl.engine_of(r) == e for r in ranks)
        assert pl.leader(e) == ranks[0] and pl.is_leader(ranks[0]) and not pl.is_leader(ranks[1])
    assert [pl.node_of(g[0]) for g in pl.groups] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert pl.name(5) == "engine 5 (ranks 20-23, node 2)"


@pytest.mark.parametrize(
    "name, world, engines, size",
    [
        ("qwen2.5_7b", 8, 8, 1),
        ("glm4_9b", 8, 4, 2),
        ("qwen3_8b", 8, 8, 1),
        ("qwen3_30b_a3b", 8, 2, 4),  # one node of its 4: 2 engines of TP=4 (4 KV groups)
        ("tiny_cpu", 2, 2, 1),
    ],
)
def test_other_examples_use_their_own_placement(name, world, engines, size):
    pl = _example(name, world, world)
    assert (pl.num_engines, pl.ranks_per_engine) == (engines, size)
    assert sorted(r for g in pl.groups for r in g) == list(range(world))  # every rank takes part


def test_unset_engines_per_node_fills_each_node():
    pl = place_engines(16, 8, engines_per_node=None, ranks_per_engine=2)
    assert pl.num_engines == 8 and pl.engines_per_node == 4
    assert pl.name(0) == "engine 0 (ranks 0-1, node 0)"
    one = place_engines(2, 2, engines_per_node=None, ranks_per_engine=1)
    assert one.name(1) == "engine 1 (rank 1, node 0)"


@pytest.mark.parametrize(
    "kw, words",
    [
        (
            dict(engines_per_node=2, ranks_per_engine=2),
            ["engines_per_node=2", "vllm_tensor_parallel_size=2", "8"],
        ),
        (
            dict(engines_per_node=4, ranks_per_engine=4),
            ["engines_per_node=4", "vllm_tensor_parallel_size=4", "8"],
        ),
        (dict(engines_per_node=None, ranks_per_engine=3), ["vllm_tensor_parallel_size=3", "8 ranks"]),
        (
            dict(engines_per_node=None, ranks_per_engine=16),
            ["vllm_tensor_parallel_size=16", "span two nodes"],
        ),
    ],
)
def test_placements_that_do_not_tile_a_node_are_one_line_errors(kw, words):
    with pytest.raises(ConfigError) as e:
        place_engines(32, 8, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_uneven_nodes_and_groups_across_hosts_are_refused():
    with pytest.raises(ConfigError, match="whole number of nodes"):
        place_engines(12, 8, engines_per_node=None, ranks_per_engine=1)
    pl = place_engines(8, 4, engines_per_node=2, ranks_per_engine=2)
    check_nodes(pl, ["a"] * 4 + ["b"] * 4)
    with pytest.raises(ConfigError, match=r"engine 1 \(ranks 2-3, node 0\) spans hosts \['a', 'b'\]"):
        check_nodes(pl, ["a", "a", "a", "b", "b", "b", "b", "b"])


def test_deal_is_round_robin_and_merge_restores_prompt_order():
    assert deal(7, 3) == [[0, 3, 6], [1, 4], [2, 5]]
    for n, e in [(32, 8), (5, 2), (3, 4), (0, 2), (17, 1)]:
        shards = deal(n, e)
        sizes = [len(s) for s in shards]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
        assert merge([[f"p{i}" for i in s] for s in shards], n) == [f"p{i}" for i in range(n)]
    with pytest.raises(ValueError, match="engine 1 returned 1 results for 2 items"):
        merge([["a", "c"], ["b"]], 4)


def test_single_engine_is_reported_by_rank_0():
    pl = single_engine(4)
    assert pl.num_engines == 1 and pl.is_leader(0) and not pl.is_leader(3) and pl.engine_of(3) == 0
