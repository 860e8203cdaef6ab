#!/usr/bin/env bash
# Benchmark accuracy and the inference-scaling sweep of a checkpoint on one node (vLLM inside).
#   CKPT=runs/qwen2.5_32b_t1_rl/checkpoints MODEL_DIR=/models/Qwen2.5-32B sbatch slurm/eval.sh
#   CONFIG=examples/glm4_9b/rl.yaml CKPT=... SETS="eval.n_samples=32" sbatch slurm/eval.sh
# Dry run without Slurm: python -m megatron_t1.launch slurm/eval.sh
#SBATCH --job-name=t1-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

T1_ROOT=${T1_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f $T1_ROOT/slurm/common.sh ]]; then
    echo "error: $T1_ROOT is not the repository: submit from its root or set T1_ROOT" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "$T1_ROOT/slurm/common.sh"
t1_init

# CKPT: an HF folder or a Megatron checkpoint (a run's checkpoints/ or a step folder).
args=(python -m megatron_t1 eval
    --checkpoint "${CKPT:?set CKPT to a checkpoint folder or the checkpoints/ of a run}"
    --benchmarks "${BENCHMARKS:-math500,aime2024,omni_math500}"
    --data-dir "${DATA_DIR:-$T1_ROOT/data/benchmarks}"
    --n "${N_SAMPLES:-32}" --max-new-tokens "${MAX_NEW_TOKENS:-16384}"
    --engine "${ENGINE:-vllm}" --dtype bfloat16
    --out "${OUTPUT_DIR:-$T1_ROOT/runs}/eval-${SLURM_JOB_ID:-local}")
if [[ -n ${MODEL_DIR:-} ]]; then
    args+=(--tokenizer "$MODEL_DIR")
fi

t1_srun 1 "${args[@]}"
