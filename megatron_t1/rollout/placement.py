"""Where the rollout engines live in a job, and which prompts each one samples.

Colocated placement (the default on a cluster, ``docs/cluster.md``): the job's ranks split into
*rollout groups* of ``rollout.vllm_tensor_parallel_size`` consecutive ranks; every group lies inside
one node and hosts one engine. A node of G ranks holds ``rollout.engines_per_node`` groups, which must
tile it exactly (``engines_per_node x vllm_tensor_parallel_size == G``; ``engines_per_node: null``
fills the node). torchrun numbers the ranks node by node, so consecutive ranks share a node.

A step's prompts are dealt to the engines by prompt index (prompt ``i`` to engine ``i mod E``), so the
work per engine differs by at most one prompt and the merged result is in prompt order again, the
same for any number of engines.

Pure Python (no torch, no megatron): the placement of a 32-GPU job is built and checked on a laptop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from megatron_t1.config import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class RolloutPlacement:
    """The rollout groups of a job: ``groups[e]`` are the global ranks of engine ``e``."""

    world_size: int
    ranks_per_node: int
    ranks_per_engine: int
    groups: tuple[tuple[int, ...], ...]

    @property
    def num_engines(self) -> int:
        return len(self.groups)

    @property
    def engines_per_node(self) -> int:
        return self.ranks_per_node // self.ranks_per_engine

    def engine_of(self, rank: int) -> int:
        """The engine whose group holds ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size}")
        return rank // self.ranks_per_engine

    def leader(self, engine: int) -> int:
        """The group's first rank: it reports the engine's results."""
        return self.groups[engine][0]

    def is_leader(self, rank: int) -> bool:
        return self.leader(self.engine_of(rank)) == rank

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def name(self, engine: int) -> str:
        """``engine 3 (ranks 12-15, node 1)``: how errors and logs name an engine."""
        ranks = self.groups[engine]
        span = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        return f"engine {engine} ({span}, node {self.node_of(ranks[0])})"

    def describe(self) -> str:
        """One line for the run log."""
        return (
            f"{self.num_engines} rollout engine(s) of {self.ranks_per_engine} rank(s), "
            f"{self.engines_per_node} per node of {self.ranks_per_node} ranks"
        )


def place_engines(
    world_size: int,
    ranks_per_node: int,
    *,
    engines_per_node: int | None,
    ranks_per_engine: int,
) -> RolloutPlacement:
    """The rollout groups of a job of ``world_size`` ranks, ``ranks_per_node`` per node.

    ``ranks_per_engine`` is ``rollout.vllm_tensor_parallel_size``; ``engines_per_node`` is
    ``rollout.engines_per_node`` (None: as many as fill a node). Raises :class:`ConfigError` naming
    both fields and the node size when the groups do not tile every node.
    """
    if world_size < 1 or ranks_per_node < 1:
        raise ValueError(f"world_size and ranks_per_node must be >= 1, got {world_size}, {ranks_per_node}")
    if world_size % ranks_per_node:
        raise ConfigError(
            f"the job has {world_size} ranks, not a whole number of nodes of {ranks_per_node} ranks "
            "(every node must run the same number of ranks)"
        )
    if ranks_per_engine < 1:
        raise ConfigError(f"rollout.vllm_tensor_parallel_size must be >= 1, got {ranks_per_engine}")
    if engines_per_node is None:
        if ranks_per_node % ranks_per_engine:
            raise ConfigError(
                f"rollout.vllm_tensor_parallel_size={ranks_per_engine} does not divide the node's "
                f"{ranks_per_node} ranks (GPUs): an engine cannot span two nodes "
                "(rollout.engines_per_node is unset, so the engines fill each node)"
            )
        engines_per_node = ranks_per_node // ranks_per_engine
    if engines_per_node * ranks_per_engine != ranks_per_node:
        raise ConfigError(
            f"rollout.engines_per_node={engines_per_node} x rollout.vllm_tensor_parallel_size="
            f"{ranks_per_engine} = {engines_per_node * ranks_per_engine} must equal the ranks (GPUs) per "
            f"node, {ranks_per_node}: every rank takes part in rollouts"
        )
    groups = tuple(
        tuple(range(start, start + ranks_per_engine)) for start in range(0, world_size, ranks_per_engine)
    )
    return RolloutPlacement(world_size, ranks_per_node, ranks_per_engine, groups)


def single_engine(world_size: int) -> RolloutPlacement:
    """One engine for the whole job, reported by rank 0 (server mode: rank 0 drives the servers)."""
    return RolloutPlacement(world_size, world_size, world_size, (tuple(range(world_size)),))


def check_nodes(placement: RolloutPlacement, hosts: Sequence[str]) -> None:
    """Every group must lie on one host (``hosts[r]``: rank r's host name). torchrun numbers ranks
    node by node; a launcher that does not (or a wrong LOCAL_WORLD_SIZE) is caught here."""
    if len(hosts) != placement.world_size:
        raise ValueError(f"{len(hosts)} host names for {placement.world_size} ranks")
    for e, ranks in enumerate(placement.groups):
        names = sorted({hosts[r] for r in ranks})
        if len(names) > 1:
            raise ConfigError(
                f"rollout {placement.name(e)} spans hosts {names}: the job's ranks are not numbered node by "
                f"node in blocks of {placement.ranks_per_node} (launch with torchrun, one agent per node)"
            )


def deal(n_items: int, n_engines: int) -> list[list[int]]:
    """Item indices per engine: item ``i`` goes to engine ``i mod n_engines``."""
    if n_engines < 1:
        raise ValueError(f"n_engines must be >= 1, got {n_engines}")
    return [list(range(e, n_items, n_engines)) for e in range(n_engines)]


def merge(shards: Sequence[Sequence[T]], n_items: int) -> list[T]:
    """Undo :func:`deal`: ``shards[e]`` holds the results of engine e's items, in its order."""
    out: list = [None] * n_items
    for e, (idx, part) in enumerate(zip(deal(n_items, len(shards)), shards)):
        if len(part) != len(idx):
            raise ValueError(f"engine {e} returned {len(part)} results for {len(idx)} items")
        for i, x in zip(idx, part):
            out[i] = x
    return out
