#!/usr/bin/env bash
# T1 SFT (stage 1) on Qwen2.5-32B: 4 nodes x 8 GPUs, Megatron TP=8 PP=2 DP=2.
#   mkdir -p runs && sbatch slurm/sft_32b.sh                # from the repository root
#   MODEL_DIR=/models/Qwen2.5-32B DATA=/data/t1_sft.jsonl INIT_FROM=/ckpt/qwen2.5_32b_mcore sbatch slurm/sft_32b.sh
# INIT_FROM is the converted HF model (slurm/convert.sh). Requeue resumes from runs/$RUN_NAME/checkpoints.
# Dry run without Slurm: python -m megatron_t1.launch slurm/sft_32b.sh
#SBATCH --job-name=t1-sft-32b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
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
# SFT has no vLLM in the process: expandable segments cut fragmentation (vLLM's sleep mode forbids them).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

CONFIG=${CONFIG:-examples/qwen2.5_32b/sft.yaml}
RUN_NAME=${RUN_NAME:-qwen2.5_32b_t1_sft}
args=(-m megatron_t1 sft --config "$CONFIG")
t1_sets args "run.name=$RUN_NAME" "run.output_dir=${OUTPUT_DIR:-$T1_ROOT/runs}" \
    "model.tokenizer=${MODEL_DIR:-}" "data.train_path=${DATA:-}" "checkpoint.init_from=${INIT_FROM:-}"
launcher=()
t1_torchrun launcher

t1_srun 1 "${launcher[@]}" "${args[@]}"
