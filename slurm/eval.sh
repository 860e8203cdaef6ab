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

CONFIG=${CONFIG:-examples/qwen2.5_32b/rl.yaml}
args=(python -m megatron_t1 eval --config "$CONFIG")
t1_sets args "run.output_dir=${OUTPUT_DIR:-$T1_ROOT/runs}" "model.tokenizer=${MODEL_DIR:-}" \
    "checkpoint.init_from=${CKPT:?set CKPT to a checkpoint folder or the checkpoints/ of a run}" \
    "eval.heldout_path=${HELDOUT:-}"

t1_srun 1 "${args[@]}"
