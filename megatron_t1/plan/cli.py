"""Per-GPU memory planner: will a config fit, and if not, what to change.

``python -m megatron_t1 plan --config FILE [--job slurm/X.sh | --nodes N --gpus-per-node G] --gpu-mem 80``
prints, for the worst pipeline stage, the bytes of every resident tensor class in the phases of a
colocated T1 run (train, anchor log-probs, weight sync, rollout) and exits 0 when all fit, 3 when one
does not (with the single changes of TP, PP, micro-batch, recompute, ... that make it fit). The job's
shape comes from ``--nodes`` / ``--gpus-per-node``, else from the ``#SBATCH`` lines of ``--job``, else
from the Slurm allocation it runs in; failing all three it plans the fewest nodes that hold one model
replica and says so. Pure Python: no torch, megatron or vllm import.

The estimate is :mod:`megatron_t1.plan.planner`'s; this module reads the flags and the job's shape
and prints the table (or ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from megatron_t1.plan.formulas import inputs_from_config
from megatron_t1.plan.planner import format_plan, plan_memory, plan_to_dict, suggest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m megatron_t1 plan``."""
    parser.add_argument("--config", required=True, help="YAML config (see examples/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set data.micro_batch_size=2 (repeatable)",
    )
    parser.add_argument(
        "--job",
        default=None,
        metavar="SCRIPT",
        help="a Slurm batch script (e.g. slurm/rl_32b.sh): nodes and GPUs per node from its #SBATCH lines",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=None,
        help="nodes of the job (default: --job, else the Slurm allocation this runs in, else the fewest "
        "that hold TP x PP GPUs, x EP for MoE)",
    )
    parser.add_argument(
        "--gpus-per-node", type=int, default=None, help="GPUs per node (default: --job, the allocation, or 8)"
    )
    parser.add_argument(
        "--gpu-mem",
        type=float,
        default=80.0,
        help="memory per GPU in GiB (default 80; an H100 80GB reports 79.6)",
    )
    parser.add_argument(
        "--reserve-gib",
        type=float,
        default=3.0,
        help="CUDA context, NCCL buffers and fragmentation per GPU (default 3)",
    )
    parser.add_argument(
        "--mode",
        choices=["auto", "sft", "rl"],
        default="auto",
        help="auto: rl when rollout.engine is vllm (adds the anchor and the rollout phase)",
    )
    parser.add_argument(
        "--attention",
        choices=["flash", "unfused"],
        default="flash",
        help="flash: TransformerEngine spec or the local spec with model.core_attention=sdpa (the "
        "default); unfused: the local spec with model.core_attention=megatron",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")


_SBATCH = re.compile(r"^#SBATCH\s+(--nodes|-N|--gpus-per-node)(?:=|\s+)(\S+)", re.M)


def job_shape(script: str | None = None, env=None) -> tuple[int | None, int | None, str]:
    """``(nodes, gpus_per_node, source)`` of the job: from the ``#SBATCH --nodes`` / ``-N`` and
    ``--gpus-per-node`` lines of ``script`` when given, else from the Slurm allocation in ``env``
    (``SLURM_JOB_NUM_NODES``, ``SLURM_GPUS_ON_NODE``), else ``(None, None, "")``. A node range
    (``--nodes=2-4``) plans its lower end; a typed GPU count (``h100:8``) its number."""
    from megatron_t1.config import ConfigError

    if script is not None:
        try:
            text = open(script).read()
        except OSError as e:
            raise ConfigError(f"--job {script}: cannot read it ({e.strerror})") from None
        found = {}
        for key, value in _SBATCH.findall(text):
            found["nodes" if key in ("--nodes", "-N") else "gpus"] = value
        if "nodes" not in found:
            raise ConfigError(f"--job {script}: no '#SBATCH --nodes=N' line")
        try:
            nodes = int(found["nodes"].split("-")[0])
            gpus = int(found["gpus"].split(":")[-1]) if "gpus" in found else None
        except ValueError:
            raise ConfigError(f"--job {script}: cannot read '#SBATCH' values {found}") from None
        return nodes, gpus, f"from {script}"
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES"):
        nodes = int(env.get("SLURM_JOB_NUM_NODES") or env["SLURM_NNODES"])
        gpus = env.get("SLURM_GPUS_ON_NODE")
        return nodes, int(gpus.split(":")[-1]) if gpus else None, "from the Slurm allocation"
    return None, None, ""


def run(args: argparse.Namespace) -> int:
    """Print the plan; 0 when it fits, 3 when it does not (config errors raise ConfigError)."""
    from megatron_t1.config import load_config

    cfg = load_config(args.config, args.overrides)
    nodes, gpus, where = job_shape(args.job)
    nodes = args.nodes if args.nodes is not None else nodes
    gpus = args.gpus_per_node if args.gpus_per_node is not None else (gpus or 8)
    x = inputs_from_config(
        cfg,
        nodes=nodes,
        gpus_per_node=gpus,
        gpu_mem_gib=args.gpu_mem,
        reserve_gib=args.reserve_gib,
        mode=args.mode,
        attention=args.attention,
    )
    plan = plan_memory(x)
    if args.nodes is not None:
        where = "--nodes"
    elif nodes is None:
        held = "TP x PP x EP" if x.num_experts else "TP x PP"
        where = f"assumed: the fewest that hold {held}; give --job or --nodes for the job's real size"
    plan.notes.insert(0, f"job: {x.nodes} node(s) x {x.gpus_per_node} GPUs ({where})")
    if not plan.fits:
        plan.suggestions = suggest(x)
    if args.json:
        print(json.dumps(plan_to_dict(plan), indent=1))
    else:
        print(format_plan(plan, str(args.config)))
    return 0 if plan.fits else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_t1.plan", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from megatron_t1.config import ConfigError

    try:
        return run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
