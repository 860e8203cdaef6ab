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
