"""Router load balance of a Megatron-Core MoE policy, measured on the tokens a training step routes.

An MoE layer is only as fast as its busiest expert (the alltoall dispatcher waits for it, and with
a capacity factor it drops tokens), and a collapsing router (a few experts take everything) is the
classic failure of MoE RL. So every step logs, per layer, ``max_e tokens_e / mean_e tokens_e`` over
the tokens of the whole global batch: 1.0 is perfectly balanced, ``num_experts / topk`` the worst
case (every token sent to the same k experts).

How: a forward hook on each layer's router adds up its ``routing_map`` (``[tokens, experts]``, the
top-k choice) during the step, into one ``[layers, experts]`` table indexed by the *global* layer
number. The table is summed over the data-parallel ranks (each routes its own tokens; the EP ranks
are among them), over TP under sequence parallelism (each TP rank then routes a slice of the
sequence; without it every TP rank routes the same tokens and is counted once) and over pipeline
stages (each fills its own layers). Padding tokens are routed like the rest, so they are counted:
the experts compute them. Activation recomputation runs the routers twice, which scales every count
alike and leaves the ratios unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_t1.mcore.model import unwrap


def _routers(chunks: Sequence[torch.nn.Module]) -> list[tuple[int, torch.nn.Module]]:
    """``[(global layer index, router module)]`` of this rank's chunks."""
    out = []
    for chunk in chunks:
        for layer in unwrap(chunk).decoder.layers:
            router = getattr(layer.mlp, "router", None)
            if router is not None:
                out.append((layer.layer_number - 1, router))  # Megatron numbers layers from 1, globally
    return out


class RouterLoad:
    """Tokens per expert per layer over one step; see the module docstring.

    ``with load.counting(): <forward/backward>``, then :meth:`metrics` (a collective: every rank of
    the job calls it).
    """

    def __init__(
        self, chunks: Sequence[torch.nn.Module], num_layers: int, num_experts: int, device: torch.device
    ) -> None:
        self.routers = _routers(chunks)
        self.num_layers, self.num_experts = num_layers, num_experts
        # On the model's device: the hooks add to it without a host sync per layer.
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device)

    @classmethod
    def for_model(cls, chunks: Sequence[torch.nn.Module]) -> RouterLoad | None:
        """From the chunks' Megatron config; None for a dense model."""
        tcfg = unwrap(chunks[0]).config
        if not tcfg.num_moe_experts:
            return None
        device = next(unwrap(chunks[0]).parameters()).device
        return cls(chunks, tcfg.num_layers, tcfg.num_moe_experts, device)

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Count the routing of every forward pass inside the block (the table starts from zero)."""
        self.counts.zero_()
        handles = [r.register_forward_hook(self._hook(i)) for i, r in self.routers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, layer: int):
        def hook(_module, _inputs, output) -> None:
            routing_map = output[1]  # (probs, routing_map [tokens, experts] bool)
            self.counts[layer] += routing_map.detach().sum(0, dtype=torch.float64)

        return hook

    def reduce(self) -> torch.Tensor:
        """The job-wide ``[layers, experts]`` token counts (identical on every rank)."""
        t = self.counts.clone()
        if dist.is_initialized() and ps.model_parallel_is_initialized():
            dist.all_reduce(t, group=ps.get_data_parallel_group())
            tp_group = ps.get_tensor_model_parallel_group()
            if self.routers and self.routers[0][1].config.sequence_parallel:
                dist.all_reduce(t, group=tp_group)
            if ps.get_pipeline_model_parallel_world_size() > 1:
                dist.all_reduce(t, group=ps.get_pipeline_model_parallel_group())
        return t.cpu()

    def metrics(self) -> dict[str, float]:
        """``moe/load_max_over_mean`` (mean over layers), ``moe/load_max_over_mean_worst`` (the worst
        layer) and ``moe/tokens_routed`` (token-expert assignments, all layers)."""
        return load_metrics(self.reduce())


def load_metrics(counts: torch.Tensor) -> dict[str, float]:
    """The balance numbers of a ``[layers, experts]`` table of token counts (layers with no token are
    left out)."""
    per_layer = counts.sum(1)
    used = per_layer > 0
    if not bool(used.any()):
        return {}
    ratio = counts[used].max(1).values / (per_layer[used] / counts.shape[1])
    return {
        "moe/load_max_over_mean": float(ratio.mean()),
        "moe/load_max_over_mean_worst": float(ratio.max()),
        "moe/tokens_routed": float(per_layer.sum()),
    }


# --------------------------------------------------------------------------------------------------
# Routing replay: the trainer's routers take the experts the rollout engine chose
# --------------------------------------------------------------------------------------------------


def router_token_routes(routes: torch.Tensor, *, sequence_parallel: bool) -> torch.Tensor:
    """A micro-batch's recorded routing ``[b, s, layers, k]`` in the order a Megatron router sees its
    tokens: the hidden states are ``[s, b, H]`` flattened to ``[s * b, H]``, so row ``i * b + j`` is
    position i of row j (THD micro-batches are ``[1, T]``: row i is token i). Under sequence
    parallelism each TP rank routes its contiguous ``1 / TP`` of those rows."""
    b, s = routes.shape[:2]
    flat = routes.transpose(0, 1).reshape(s * b, *routes.shape[2:])
    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    if sequence_parallel and tp > 1:
        n = flat.shape[0] // tp
        r = ps.get_tensor_model_parallel_rank()
        flat = flat[r * n : (r + 1) * n]
    return flat


class RouteAgreement:
    """Sums of how often the trainer's own top-k equals the engine's recorded choice: ``same`` and
    ``total`` over (token, layer) pairs with a recorded choice (:meth:`metrics` reduces them)."""

    def __init__(self) -> None:
        self.same = 0.0
        self.total = 0.0

    def add(self, own: torch.Tensor, recorded: torch.Tensor) -> None:
        """own, recorded: ``[tokens, k]`` expert indices; rows of ``recorded`` with -1 are skipped."""
        valid = (recorded >= 0).all(-1)
        eq = (own.sort(-1).values == recorded.sort(-1).values).all(-1) & valid
        self.same += float(eq.sum())
        self.total += float(valid.sum())

    def metrics(self, group=None) -> dict[str, float]:
        """``moe/route_agreement`` summed over ``group``'s ranks (a collective when it is given)."""
        t = torch.tensor([self.same, self.total], dtype=torch.float64)
        if group is not None:
            dist.all_reduce(t, group=group)
        return {"moe/route_agreement": float(t[0] / t[1])} if t[1] > 0 else {}


@contextlib.contextmanager
def recorded_routing(
    model: torch.nn.Module, batch: dict, *, replay: bool, agreement: RouteAgreement | None = None
) -> Iterator[None]:
    """Around one micro-batch forward of a model chunk: with ``replay`` its routers route every token
    to the experts in ``batch["routed_experts"]`` (``[b, s, layers, k]``, global layer index, -1 where
    nothing was recorded: those tokens get experts 0..k-1, and they are never trained on: padding and
    each document's last token). The probabilities are still the router's own softmax at those
    experts, so the router is trained. With ``agreement`` each router's own top-k is compared with the
    record too. Without ``routed_experts`` in the batch, or neither option, nothing changes."""
    routes = batch.get("routed_experts")
    routers = _routers([model]) if routes is not None and (replay or agreement is not None) else []
    if not routers:
        yield
        return
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    flat = router_token_routes(routes, sequence_parallel=routers[0][1].config.sequence_parallel)
    k = flat.shape[-1]
    filler = torch.arange(k, dtype=flat.dtype, device=flat.device)
    patched = []
    for layer, router in routers:
        recorded = flat[:, layer]
        if agreement is not None:
            patched.append(router)
            router.routing = _comparing(router, recorded, agreement)
        if replay:
            if router.router_replay is None:
                raise RuntimeError(
                    "routing replay: the model was built without moe_enable_routing_replay "
                    "(loss.routing_replay must be set when the model is built)"
                )
            target = torch.where(recorded >= 0, recorded, filler).long()
            router.router_replay.set_target_indices(target)
            router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    try:
        yield
    finally:
        for router in patched:
            del router.routing
        if replay:
            for _, router in routers:
                router.router_replay.clear_indices()
                router.router_replay.clear_router_replay_action()


def _comparing(router: torch.nn.Module, recorded: torch.Tensor, agreement: RouteAgreement):
    routing = type(router).routing.__get__(router)

    def compare_then_route(logits: torch.Tensor, *args, **kwargs):
        own = torch.topk(logits.detach().view(-1, logits.shape[-1]), router.topk, dim=-1).indices
        agreement.add(own, recorded.to(own.device).long())
        return routing(logits, *args, **kwargs)

    return compare_then_route
