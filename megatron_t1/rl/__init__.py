"""The T1 RL objective in pure torch (arXiv 2501.11651): never imports megatron or vllm.

    logprobs    token log-prob + full-vocabulary entropy, chunked, vocab-parallel (custom autograd)
    fused       the same straight from hidden states and the output-layer weight, logits never built
    kl          k1 / k2 / k3 estimators of KL(pi_theta || pi_anchor), per-response reduction
    advantage   reward shaping s = r - beta * KL, the RLOO (or GRPO) advantage, per token
    mismatch    train/rollout log-prob mismatch and the truncated importance weights (TIS)
    oversample  keep k of K responses per prompt
    objective   t1_loss -> LossOutput(loss, metrics)
    anchor      the dynamic anchor's schedule and in-place EMA / reset
    config      LossConfig, AnchorConfig

Names are imported lazily so that ``megatron_t1.config`` (which needs only ``rl.config``) does not pull
in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LossConfig": "config",
    "AnchorConfig": "config",
    "token_logprobs_and_entropy": "logprobs",
    "fused_token_logprobs_and_entropy": "fused",
    "kl_estimate": "kl",
    "response_kl": "kl",
    "response_kl_parts": "kl",
    "finish_response_kl": "kl",
    "t1_advantages": "advantage",
    "token_advantages": "advantage",
    "logprob_mismatch": "mismatch",
    "truncated_is_weights": "mismatch",
    "select_responses": "oversample",
    "gather_selected": "oversample",
    "Selection": "oversample",
    "t1_loss": "objective",
    "LossOutput": "objective",
    "anchor_action": "anchor",
    "update_anchor_": "anchor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
