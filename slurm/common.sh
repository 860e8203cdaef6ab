# shellcheck shell=bash
# Shared by slurm/{rl_32b,sft_32b,convert,eval}.sh: the environment, facts of the allocation, the job's
# log folder, and the one srun that starts a command on every node. Sourced, never run.
#
# Variables a user may set (sbatch passes the submitting shell's environment):
#   T1_ROOT          repository on a shared filesystem (default: the folder sbatch was called from)
#   T1_CACHE         shared cache for HF downloads and compiled kernels (default: $T1_ROOT/.cache)
#   T1_LOG_ROOT      parent of the per-job log folders (default: $T1_ROOT/runs/slurm)
#   OUTPUT_DIR       parent of run folders, i.e. run.output_dir (default: $T1_ROOT/runs)
#   CONTAINER_IMAGE  run inside this image with pyxis (srun --container-image); unset: the job's Python
#   CONTAINER_MOUNTS extra pyxis mounts, "src:dst[,src:dst]" ($T1_ROOT and $T1_CACHE are always mounted)
#   MASTER_PORT      rendezvous port (default: 20000 + job id mod 20000)
#   SETS             extra config overrides, whitespace separated: SETS="optim.lr=1e-6 run.train_steps=10"
#   NCCL_*, TORCH_NCCL_*  passed through; defaults below only fill what is unset
# `python -m megatron_t1.launch slurm/X.sh --nodes 2` prints what each node would run, without Slurm.

# ---- environment that third-party libraries read (STYLE.md point 7: set in one place) -------------
t1_environment() {
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Megatron TP/SP comm ordering
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a hung peer fails the job
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
    export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
    export PYTHONUNBUFFERED=1
    # The repository is importable without an install (containers bring only the dependencies).
    case ":${PYTHONPATH:-}:" in
        *":$T1_ROOT:"*) ;;
        *) export PYTHONPATH="$T1_ROOT${PYTHONPATH:+:$PYTHONPATH}" ;;
    esac
    # Shared across nodes and jobs: model downloads. Per node (/tmp): kernels compiled at run time,
    # whose caches are not safe to fill from several nodes at once on a network filesystem.
    export T1_CACHE=${T1_CACHE:-$T1_ROOT/.cache}
    export HF_HOME=${HF_HOME:-$T1_CACHE/huggingface}
    export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$T1_CACHE/vllm}
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/${USER:-t1}-triton}
    export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/${USER:-t1}-inductor}
    mkdir -p "$HF_HOME" "$VLLM_CACHE_ROOT"
}

# ---- facts of the allocation ----------------------------------------------------------------------
t1_allocation() {
    : "${SLURM_JOB_ID:?not inside a Slurm job (submit with sbatch, or dry-run with python -m megatron_t1.launch)}"
    NNODES=${SLURM_NNODES:?}
    GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}
    GPUS_PER_NODE=${GPUS_PER_NODE##*:}  # "h100:8" -> 8
    local hosts
    mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")
    if [[ ${#hosts[@]} -ne $NNODES ]]; then
        echo "error: $SLURM_JOB_NODELIST expands to ${#hosts[@]} hosts, SLURM_NNODES=$NNODES" >&2
        return 1
    fi
    MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
}

# ---- the job's log folder: commit, config, environment; one folder per job, kept over requeues ------
t1_job_dir() {
    local name=${SLURM_JOB_NAME:-t1}
    LOG_DIR=${T1_LOG_ROOT:-$T1_ROOT/runs/slurm}/$name-$SLURM_JOB_ID
    mkdir -p "$LOG_DIR"
    local commit dirty
    commit=$(git -C "$T1_ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
    dirty=$(git -C "$T1_ROOT" status --porcelain --untracked-files=no 2>/dev/null | wc -l)
    {
        echo "start: $(date -Is) attempt ${SLURM_RESTART_COUNT:-0} on $NNODES node(s): $SLURM_JOB_NODELIST"
        echo "commit: $commit (modified tracked files: $dirty)"
        echo "container: ${CONTAINER_IMAGE:-none}"
        echo "master: $MASTER_ADDR:$MASTER_PORT"
    } >>"$LOG_DIR/job.txt"
    if [[ $dirty -gt 0 ]]; then
        git -C "$T1_ROOT" diff >"$LOG_DIR/git-diff-attempt${SLURM_RESTART_COUNT:-0}.patch" || true
    fi
    env | grep -E '^(SLURM_|NCCL_|TORCH_|CUDA_|HF_|VLLM_|PYTHON|T1_|MASTER_|CONTAINER_|OMP_)' | sort \
        >"$LOG_DIR/env-attempt${SLURM_RESTART_COUNT:-0}.txt" || true
    echo "t1: logs in $LOG_DIR (commit ${commit:0:12}, attempt ${SLURM_RESTART_COUNT:-0})"
}

t1_init() {
    T1_ROOT=$(cd "$T1_ROOT" && pwd)
    export T1_ROOT
    cd "$T1_ROOT" || return  # configs and tools/ are named relative to the repository on every node
    t1_allocation
    t1_environment
    t1_job_dir
}

# ---- config overrides -----------------------------------------------------------------------------
# t1_sets ARRAY_NAME key=value...: append "--set key=value" for each non-empty value, then SETS.
t1_sets() {
    local -n _out=$1
    shift
    local kv
    for kv in "$@"; do
        if [[ -n ${kv#*=} ]]; then _out+=(--set "$kv"); fi
    done
    local extra
    read -r -a extra <<<"${SETS:-}"
    for kv in "${extra[@]}"; do
        _out+=(--set "$kv")
    done
}

# ---- torchrun on every node -----------------------------------------------------------------------
# t1_torchrun ARRAY_NAME: the torchrun launcher of this allocation. @NODE_RANK@ is replaced on each node
# by its SLURM_NODEID (only known there). The agents meet at the c10d rendezvous on MASTER_ADDR:MASTER_PORT,
# which assigns the ranks (torchrun reads --node-rank only for a static rendezvous; it names the logs).
t1_torchrun() {
    local -n _cmd=$1
    _cmd=(torchrun
        --nnodes="$NNODES"
        --nproc-per-node="$GPUS_PER_NODE"
        --node-rank=@NODE_RANK@
        --rdzv-backend=c10d
        --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"
        --rdzv-id="$SLURM_JOB_ID"
        --max-restarts=0
        --log-dir="$LOG_DIR/node@NODE_RANK@"
        --tee=3
        --local-ranks-filter=0)
}

# Runs on each node under srun: substitute the node rank, then exec the command.
# shellcheck disable=SC2016  # expanded on the node, not here
T1_NODE_SCRIPT='set -euo pipefail; node=${SLURM_NODEID:?srun sets SLURM_NODEID}; cmd=();
for a in "$@"; do cmd+=("${a//@NODE_RANK@/$node}"); done; exec "${cmd[@]}"'
T1_NODE_SCRIPT=${T1_NODE_SCRIPT//$'\n'/ }  # one line: readable in job.txt and the dry run

t1_on_usr1() {
    # sbatch --signal=B:USR1@600 warns the batch shell before the time limit: put the job back in the
    # queue; the same script then resumes from the last checkpoint (run.name and output dir unchanged).
    echo "t1: time limit near, requeueing job $SLURM_JOB_ID" >&2
    T1_SIGNALLED=1
    scontrol requeue "$SLURM_JOB_ID"
}

# t1_srun TASKS_PER_NODE COMMAND...: one srun over all nodes (in $CONTAINER_IMAGE when set), waited for
# in the background so that the USR1 trap runs while it is going.
t1_srun() {
    local tasks=$1
    shift
    local srun=(srun
        --nodes="$NNODES"
        --ntasks-per-node="$tasks"
        --kill-on-bad-exit=1
        --label)
    if [[ -n ${SLURM_CPUS_ON_NODE:-} ]]; then
        # Steps get 1 CPU per task unless told: torchrun's workers and data loaders need the node.
        srun+=(--cpus-per-task="$((SLURM_CPUS_ON_NODE / tasks))")
    fi
    if [[ -n ${CONTAINER_IMAGE:-} ]]; then
        srun+=(--container-image="$CONTAINER_IMAGE"
            --container-mounts="$T1_ROOT:$T1_ROOT,$T1_CACHE:$T1_CACHE${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
            --container-workdir="$T1_ROOT")
    fi
    srun+=(bash -c "$T1_NODE_SCRIPT" t1-node "$@")
    {
        printf 'srun:'
        printf ' %q' "${srun[@]}"
        echo
    } >>"$LOG_DIR/job.txt"

    T1_SIGNALLED=
    trap t1_on_usr1 USR1
    "${srun[@]}" &
    local pid=$! rc=0
    while :; do
        rc=0
        wait "$pid" || rc=$?
        # wait returns > 128 when the trap interrupted it; srun is still running then.
        if [[ $rc -gt 128 && -n $T1_SIGNALLED ]]; then
            T1_SIGNALLED=
            continue
        fi
        break
    done
    trap - USR1
    echo "end: $(date -Is) exit $rc" >>"$LOG_DIR/job.txt"
    return "$rc"
}
