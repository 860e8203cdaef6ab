#!/usr/bin/env bash
# T1 RL (stage 2) on Qwen2.5-32B: 4 nodes x 8 GPUs, Megatron TP=8 PP=2 DP=2 with colocated vLLM engines.
#   mkdir -p runs && sbatch slurm/rl_32b.sh                 # from the repository root
#   MODEL_DIR=/models/Qwen2.5-32B DATA=/data/prompts.jsonl INIT_FROM=runs/qwen2.5_32b_t1_sft/checkpoints \
#       CONTAINER_IMAGE=/images/t1.sqsh sbatch slurm/rl_32b.sh
#   CONFIG=examples/qwen2.5_7b/rl.yaml sbatch --nodes 1 slurm/rl_32b.sh   # another example config
# Requeue (preemption, or the USR1 warning before the time limit) reruns this script, which resumes
# from runs/$RUN_NAME/checkpoints/latest. Dry run without Slurm: python -m megatron_t1.launch slurm/rl_32b.sh
#SBATCH --job-name=t1-rl-32b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
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
RUN_NAME=${RUN_NAME:-qwen2.5_32b_t1_rl}
args=(-m megatron_t1 rl --config "$CONFIG")
t1_sets args "run.name=$RUN_NAME" "run.output_dir=${OUTPUT_DIR:-$T1_ROOT/runs}" \
    "model.tokenizer=${MODEL_DIR:-}" "data.train_path=${DATA:-}" "checkpoint.init_from=${INIT_FROM:-}"
launcher=()
t1_torchrun launcher

t1_srun 1 "${launcher[@]}" "${args[@]}"
