"""Dry run of the Slurm scripts without Slurm: what would every node run?

``python -m megatron_t1.launch slurm/rl_32b.sh --nodes 2 [--gpus-per-node 8] [--env KEY=VALUE ...]``

It runs the real script with ``bash`` as ``sbatch`` would start it on the first node of an allocation
(fake ``SLURM_*`` variables: job id, node list, GPUs and CPUs per node, restart count), with three
commands put first on ``PATH`` in place of Slurm's and the launchers':

* ``scontrol show hostnames LIST`` expands a Slurm host list (:func:`expand_hostlist`);
  ``scontrol requeue ID`` prints itself.
* ``srun OPTIONS COMMAND...`` prints itself, then runs COMMAND once per node, one after the other,
  with that node's ``SLURM_NODEID`` / ``SLURM_PROCID`` / ``SLURMD_NODENAME`` (what srun sets).
* ``torchrun`` and ``python`` print their command line, prefixed ``[node N HOST]``, plus the
  variables third-party libraries read (``env:`` line), and exit 0.

So the per-node substitution in ``slurm/common.sh`` runs for real and the printed lines are the exact
commands each node would exec. :func:`dry_run` parses them for tests. Pure Python, no torch import.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DryRun", "dry_run", "expand_hostlist", "main", "sbatch_header"]

ROOT = Path(__file__).resolve().parents[1]
SHIMMED = ("srun", "scontrol", "torchrun", "python")
ENV_SHOWN = re.compile(
    r"^(CUDA_DEVICE_MAX_CONNECTIONS|NCCL_\w+|TORCH_NCCL_\w+|HF_HOME|VLLM_\w+|"
    r"PYTORCH_CUDA_ALLOC_CONF|MASTER_ADDR|MASTER_PORT|PYTHONPATH|OMP_NUM_THREADS)$"
)
NODE_LINE = re.compile(r"^\[node (\d+) (\S+)\] (?!env: |container: )(.*)$")


def expand_hostlist(spec: str) -> list[str]:
    """Slurm host list -> host names: ``gpu[001-003,007],login1`` -> gpu001 gpu002 gpu003 gpu007 login1.

    Ranges keep their zero padding; several bracket groups in one name multiply out.
    """
    hosts: list[str] = []
    for item in _split_top(spec):
        m = re.search(r"\[([^\]]+)\]", item)
        if not m:
            hosts.append(item)
            continue
        head, tail = item[: m.start()], item[m.end() :]
        for part in m.group(1).split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                for i in range(int(lo), int(hi) + 1):
                    hosts.extend(expand_hostlist(f"{head}{i:0{width}d}{tail}"))
            else:
                hosts.extend(expand_hostlist(f"{head}{part}{tail}"))
    return hosts


def _split_top(spec: str) -> list[str]:
    """Split on commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in spec:
        if ch == "," and depth == 0:
            if cur:
                out.append(cur)
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    if cur:
        out.append(cur)
    return out


def sbatch_header(script: str | os.PathLike) -> dict[str, str]:
    """``#SBATCH --key=value`` lines of a script (before its first command), as {key: value}."""
    opts: dict[str, str] = {}
    for line in Path(script).read_text().splitlines():
        s = line.strip()
        if s.startswith("#SBATCH"):
            for tok in shlex.split(s[len("#SBATCH") :]):
                if tok.startswith("--"):
                    key, _, value = tok[2:].partition("=")
                    opts[key] = value
        elif s and not s.startswith("#"):
            break
    return opts


@dataclass
class DryRun:
    """Result of :func:`dry_run`: exit status, the whole output, and the parsed per-node commands."""

    returncode: int
    output: str
    srun: list[list[str]] = field(default_factory=list)
    """Each srun command line (argv)."""
    nodes: dict[int, list[list[str]]] = field(default_factory=dict)
    """node id -> the argv of every command that node exec'd (one per srun)."""
    node_env: dict[int, dict[str, str]] = field(default_factory=dict)
    """node id -> third-party environment variables seen by its last command, and ``CONTAINER``: the
    image ``srun --container-image`` starts it in."""
    hosts: dict[int, str] = field(default_factory=dict)


_SHIM = """#!/bin/sh
exec {python} -m megatron_t1.launch --shim {name} "$@"
"""


def dry_run(
    script: str | os.PathLike,
    *,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    cpus_per_node: int = 64,
    job_id: int = 4242,
    restart_count: int = 0,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float = 60.0,
) -> DryRun:
    """Run ``script`` under fake Slurm (see the module docstring). ``nodes`` / ``gpus_per_node``
    override the script's ``#SBATCH`` header like ``sbatch --nodes`` would."""
    script = Path(script).resolve()
    header = sbatch_header(script)
    n = nodes or int(header.get("nodes", "1"))
    gpus = gpus_per_node
    if gpus is None:
        gpus = int(header.get("gpus-per-node", "0").split(":")[-1])
    hostlist = f"node[001-{n:03d}]" if n > 1 else "node001"
    hosts = expand_hostlist(hostlist)
    with tempfile.TemporaryDirectory(prefix="t1-dryrun-") as shim_dir:
        for name in SHIMMED:
            p = Path(shim_dir) / name
            p.write_text(_SHIM.format(python=shlex.quote(sys.executable), name=name))
            p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        run_env = {k: v for k, v in inherited.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
        run_env.update(
            PATH=f"{shim_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            SLURM_JOB_ID=str(job_id),
            SLURM_JOBID=str(job_id),
            SLURM_JOB_NAME=header.get("job-name", script.stem),
            SLURM_NNODES=str(n),
            SLURM_JOB_NUM_NODES=str(n),
            SLURM_JOB_NODELIST=hostlist,
            SLURM_NODELIST=hostlist,
            SLURM_CPUS_ON_NODE=str(cpus_per_node),
            SLURM_SUBMIT_DIR=str(Path(cwd or ROOT).resolve()),
            SLURM_RESTART_COUNT=str(restart_count),
            SLURM_NODEID="0",
            SLURMD_NODENAME=hosts[0],
        )
        if gpus:
            run_env["SLURM_GPUS_ON_NODE"] = str(gpus)
        run_env.update(env or {})
        proc = subprocess.run(
            ["bash", str(script)],
            cwd=cwd or ROOT,
            env=run_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
    result = DryRun(proc.returncode, proc.stdout)
    for line in proc.stdout.splitlines():
        if line.startswith("+ srun "):
            result.srun.append(shlex.split(line[2:]))
        m = NODE_LINE.match(line)
        if m:
            node = int(m.group(1))
            result.hosts[node] = m.group(2)
            result.nodes.setdefault(node, []).append(shlex.split(m.group(3)))
        elif line.startswith("[node ") and "] env: " in line:
            node = int(line.split()[1])
            pairs = shlex.split(line.split("] env: ", 1)[1])
            result.node_env[node] = {**result.node_env.get(node, {}), **dict(p.split("=", 1) for p in pairs)}
        elif line.startswith("[node ") and "] container: " in line:  # printed by the srun shim
            node = int(line.split()[1])
            result.node_env.setdefault(node, {})["CONTAINER"] = line.split("] container: ", 1)[1]
    return result


# --------------------------------------------------------------------------------------------------
# The shims (run as `python -m megatron_t1.launch --shim NAME ARGS...` from the fake PATH)
# --------------------------------------------------------------------------------------------------


def _shim_scontrol(args: list[str]) -> int:
    if args[:2] == ["show", "hostnames"]:
        spec = args[2] if len(args) > 2 else os.environ.get("SLURM_JOB_NODELIST", "")
        print("\n".join(expand_hostlist(spec)))
        return 0
    print("+ scontrol " + shlex.join(args), flush=True)
    return 0


def _shim_srun(args: list[str]) -> int:
    print("+ srun " + shlex.join(args), flush=True)
    opts, i = {}, 0
    while i < len(args) and args[i].startswith("-"):
        key, _, value = args[i].lstrip("-").partition("=")
        opts[key] = value
        i += 1
    command = args[i:]
    if not command:
        print("srun (dry run): no command", file=sys.stderr)
        return 2
    n = int(opts.get("nodes") or opts.get("N") or os.environ.get("SLURM_NNODES", "1"))
    hosts = expand_hostlist(os.environ.get("SLURM_JOB_NODELIST", "node001")) or ["node001"]
    rc = 0
    for node in range(n):
        env = dict(
            os.environ,
            SLURM_NODEID=str(node),
            SLURM_PROCID=str(node),
            SLURM_LOCALID="0",
            SLURM_STEP_ID="0",
            SLURMD_NODENAME=hosts[node % len(hosts)],
        )
        if "container-image" in opts:  # what pyxis would start the command in
            print(f"[node {node} {env['SLURMD_NODENAME']}] container: {opts['container-image']}", flush=True)
        sys.stdout.flush()
        rc = subprocess.run(command, env=env, check=False).returncode or rc
    return rc


def _shim_exec(name: str, args: list[str]) -> int:
    prefix = f"[node {os.environ.get('SLURM_NODEID', '?')} {os.environ.get('SLURMD_NODENAME', '?')}]"
    shown = {k: v for k, v in sorted(os.environ.items()) if ENV_SHOWN.match(k)}
    print(f"{prefix} env: " + " ".join(shlex.quote(f"{k}={v}") for k, v in shown.items()))
    print(f"{prefix} " + shlex.join([name, *args]), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--shim"]:
        name, args = argv[1], argv[2:]
        if name == "srun":
            return _shim_srun(args)
        if name == "scontrol":
            return _shim_scontrol(args)
        return _shim_exec(name, args)
    parser = argparse.ArgumentParser(
        prog="python -m megatron_t1.launch",
        description="Print the commands every node of a Slurm job would run (no Slurm needed).",
    )
    parser.add_argument("script", help="a slurm/*.sh script")
    parser.add_argument("--nodes", type=int, default=None, help="like sbatch --nodes (default: the header)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="like sbatch --gpus-per-node")
    parser.add_argument("--job-id", type=int, default=4242)
    parser.add_argument("--restart-count", type=int, default=0, help="SLURM_RESTART_COUNT (a requeued job)")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="variable for the script, e.g. --env CONTAINER_IMAGE=/images/t1.sqsh",
    )
    args = parser.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in args.env)
    res = dry_run(
        args.script,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        job_id=args.job_id,
        restart_count=args.restart_count,
        env=env,
        cwd=os.getcwd(),
    )
    sys.stdout.write(res.output)
    return res.returncode


if __name__ == "__main__":
    raise SystemExit(main())
