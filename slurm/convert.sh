#!/usr/bin/env bash
# Checkpoint conversion on one node (tools/convert_ckpt.py; streams tensor by tensor on CPU).
#   HF_DIR=/models/Qwen2.5-32B OUT=/ckpt/qwen2.5_32b_mcore sbatch slurm/convert.sh          # HF -> Megatron
#   DIRECTION=mcore-to-hf MCORE_DIR=runs/qwen2.5_32b_t1_rl/checkpoints HF_DIR=/models/Qwen2.5-32B \
#       OUT=/export/qwen2.5_32b_t1 sbatch slurm/convert.sh                                   # Megatron -> HF
# TP/PP (hf-to-mcore) only check the model against the layout it will train at; the checkpoint
# loads at any TP/PP. Dry run without Slurm: python -m megatron_t1.launch slurm/convert.sh
#SBATCH --job-name=t1-convert
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=04:00:00
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

DIRECTION=${DIRECTION:-hf-to-mcore}
case $DIRECTION in
    hf-to-mcore)
        cmd=(python tools/convert_ckpt.py hf-to-mcore --hf-dir "${HF_DIR:?set HF_DIR}" --out "${OUT:?set OUT}"
            --tp "${TP:-8}" --pp "${PP:-2}" --no-progress) ;;
    mcore-to-hf)
        cmd=(python tools/convert_ckpt.py mcore-to-hf --mcore-dir "${MCORE_DIR:?set MCORE_DIR}" --out "${OUT:?set OUT}"
            --no-progress)
        if [[ -n ${HF_DIR:-} ]]; then cmd+=(--hf-template "$HF_DIR"); fi ;;
    *)
        echo "error: DIRECTION must be hf-to-mcore or mcore-to-hf, got $DIRECTION" >&2
        exit 2 ;;
esac
if [[ -n ${DTYPE:-} ]]; then cmd+=(--dtype "$DTYPE"); fi

t1_srun 1 "${cmd[@]}"
