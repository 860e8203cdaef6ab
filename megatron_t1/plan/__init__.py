"""Per-GPU memory planner: will a config fit, and if not, what to change.

``python -m megatron_t1 plan --config FILE [--job slurm/X.sh | --nodes N --gpus-per-node G] --gpu-mem 80``
(or ``python -m megatron_t1.plan``) prints the bytes per GPU of a config's phases and exits 0 when it
fits, 3 when it does not. Pure Python: no torch, megatron or vllm import. Three modules:

    formulas    PlanInputs and the byte / parameter formulas, with their sources and assumptions
                (what the published-figure checks of tests/unit/test_plan.py test)
    planner     the phases of a colocated T1 run (train, anchor log-probs, weight sync, rollout) for
                the worst pipeline stage, the verdict, the changes that make it fit, the table
    cli         the flags, the job's shape (``#SBATCH`` lines or the Slurm allocation), exit codes
"""

from __future__ import annotations

from megatron_t1.plan.cli import add_arguments, job_shape, main, run
from megatron_t1.plan.formulas import (
    GIB,
    MB_INT64_FIELDS,
    ParamCount,
    PlanInputs,
    count_parameters,
    export_buffer_bytes,
    inputs_from_config,
    kv_bytes_per_token,
    layer_activation_bytes,
    layer_forward_bytes,
    logits_bytes,
    microbatch_bytes,
    moe_dispatch_bytes,
    moe_saved_per_token,
    optimizer_bytes_per_param,
    rank_parameter_split,
    rank_parameters,
    routed_copies,
)
from megatron_t1.plan.planner import (
    VLLM_ASLEEP_GIB,
    VLLM_OVERHEAD_GIB,
    Item,
    Phase,
    Plan,
    format_plan,
    plan_memory,
    plan_to_dict,
    suggest,
)

__all__ = [
    "GIB", "MB_INT64_FIELDS", "VLLM_ASLEEP_GIB", "VLLM_OVERHEAD_GIB", "Item", "ParamCount", "Phase", "Plan",
    "PlanInputs", "add_arguments", "count_parameters", "export_buffer_bytes", "format_plan",
    "inputs_from_config", "job_shape", "kv_bytes_per_token", "layer_activation_bytes", "layer_forward_bytes",
    "logits_bytes", "main", "microbatch_bytes", "moe_dispatch_bytes", "moe_saved_per_token",
    "optimizer_bytes_per_param", "plan_memory", "plan_to_dict", "rank_parameter_split", "rank_parameters",
    "routed_copies", "run", "suggest",
]  # fmt: skip
