"""T1's rule-based reward: 1 correct, 0 wrong, -1 undesired (over-long, repetitive, garbage).

No torch, megatron or vllm here, and importing the package does not import sympy either: answer
equivalence (math-verify) runs inside worker processes. See :mod:`megatron_t1.reward.scorer`.
"""

from megatron_t1.reward.config import RewardConfig
from megatron_t1.reward.extract import extract_answer, split_thinking
from megatron_t1.reward.penalties import DETECTORS, detect
from megatron_t1.reward.scorer import REASONS, RewardBatch, RewardScorer, compute_rewards

__all__ = [
    "DETECTORS",
    "REASONS",
    "RewardBatch",
    "RewardConfig",
    "RewardScorer",
    "compute_rewards",
    "detect",
    "extract_answer",
    "split_thinking",
]
