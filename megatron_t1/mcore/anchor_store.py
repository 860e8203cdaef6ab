"""The dynamic anchor's weights, sharded exactly like the policy on this rank (T1, arXiv 2501.11651 §3).

One tensor per policy parameter of this rank's model chunks (same TP/PP shard, same order). Kept in
fp32 for an EMA anchor (in bf16, (1 - a)(theta - theta_ref) is mostly below half an ulp and the
anchor would never move), in the policy's dtype for a reset / frozen anchor; on the policy's device
or in CPU memory (``anchor.offload_to_cpu``). The update itself is the pure
:func:`megatron_t1.rl.anchor.update_anchor_`.

The anchor's log-prob pass runs the *policy's* modules with the anchor's weights swapped in
(:meth:`AnchorStore.swapped_in`): the same shards, the same packed micro-batches, no second model.
Saved in checkpoints under the keys ``anchor.*`` with the policy's sharding, so it reshards with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from megatron_t1.mcore.model import unwrap
from megatron_t1.rl.anchor import update_anchor_
from megatron_t1.rl.config import AnchorConfig

ANCHOR_PREFIX = "anchor."


class AnchorStore:
    """Anchor weights for this rank's chunks; see the module docstring."""

    def __init__(self, chunks: Sequence[torch.nn.Module], config: AnchorConfig):
        self.config = config
        self._chunks = list(chunks)
        self.names: list[tuple[int, str]] = []
        self.tensors: list[torch.Tensor] = []
        fp32 = config.ema is not None
        with torch.no_grad():
            for i, p_name, p in self._policy_params():
                dtype = torch.float32 if fp32 else p.dtype
                device = torch.device("cpu") if config.offload_to_cpu else p.device
                t = p.detach().to(device=device, dtype=dtype, copy=True)
                if device.type == "cpu" and p.device.type == "cuda":
                    t = t.pin_memory()
                self.names.append((i, p_name))
                self.tensors.append(t)

    def _policy_params(self) -> Iterator[tuple[int, str, torch.nn.Parameter]]:
        for i, c in enumerate(self._chunks):
            for name, p in unwrap(c).named_parameters():
                yield i, name, p

    def policy_tensors(self) -> list[torch.Tensor]:
        return [p for _, _, p in self._policy_params()]

    def update(self, step: int) -> str:
        """Apply the schedule after optimizer step ``step`` (>= 1); returns "ema", "reset" or "none"."""
        return update_anchor_(self.tensors, self.policy_tensors(), step=step, config=self.config)

    @contextlib.contextmanager
    def swapped_in(self):
        """Run the policy's modules with the anchor's weights (for its log-prob pass, no grad).

        Swaps ``param.data`` and restores it afterwards, even on error. Costs one cast of the anchor
        to the policy's dtype and device when they differ (fp32 EMA anchor under a bf16 policy, or an
        offloaded anchor), nothing otherwise.
        """
        params = self.policy_tensors()
        saved = [p.data for p in params]
        try:
            with torch.no_grad():
                for p, a in zip(params, self.tensors):
                    p.data = a.to(device=p.device, dtype=p.dtype, non_blocking=True)
            yield
        finally:
            for p, d in zip(params, saved):
                p.data = d

    def sharded_state_dict(self) -> dict:
        """``anchor.*`` ShardedTensors with the policy's sharding, pointing at the anchor's tensors."""
        lookup = {(i, n): t for (i, n), t in zip(self.names, self.tensors)}
        out: dict = {}
        for i, c in enumerate(self._chunks):
            sd = unwrap(c).sharded_state_dict(prefix=ANCHOR_PREFIX)
            for key, sh in sd.items():
                # Gated MLP weights under TP come as factories (gate and up sharded separately).
                if not isinstance(sh, (ShardedTensor, ShardedTensorFactory)):
                    continue  # _extra_state objects: the policy's checkpoint has them
                t = lookup.get((i, key.removeprefix(ANCHOR_PREFIX)))
                if t is None:
                    continue
                sh.data = t
                if isinstance(sh, ShardedTensor):
                    sh.dtype = t.dtype
                out[f"{i}.{key}"] = sh
        return out

    def load_from(self, loaded: dict) -> None:
        """Copy tensors returned by ``dist_checkpointing.load`` for :meth:`sharded_state_dict` in place."""
        lookup = {(i, n): t for (i, n), t in zip(self.names, self.tensors)}
        with torch.no_grad():
            for key, value in loaded.items():
                i, name = key.split(".", 1)
                dst = lookup[(int(i), name.removeprefix(ANCHOR_PREFIX))]
                src = value.data if isinstance(value, ShardedTensor) else value
                if src is not dst:
                    dst.copy_(src)
