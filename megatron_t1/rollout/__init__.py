"""Rollout engines (HF transformers on CPU, vLLM in-process or as a server) and the weight sync.

``engine`` holds the contract (:class:`RolloutEngine`, :class:`SamplingParams`, results, errors,
:class:`RestartableEngine`, :func:`build_engine`); the engines and the sync are imported from their
modules (``hf_engine``, ``vllm_engine``, ``weight_sync``) so that importing this package needs
neither transformers, vLLM nor Megatron.
"""

from megatron_t1.rollout.engine import (
    Completion,
    EngineError,
    Prompt,
    PromptCompletions,
    RestartableEngine,
    RolloutEngine,
    SamplingParams,
    build_engine,
)

__all__ = [
    "Completion",
    "EngineError",
    "Prompt",
    "PromptCompletions",
    "RestartableEngine",
    "RolloutEngine",
    "SamplingParams",
    "build_engine",
]
