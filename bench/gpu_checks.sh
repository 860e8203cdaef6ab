#!/usr/bin/env bash
# The GPU checks in one script, for a lent single-GPU machine with PyTorch but no megatron-core:
#   wheels (megatron-core, math-verify and its parsers) in .gpuwheels/, fetched on a networked box with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 ...
#   bash bench/gpu_checks.sh [OUT_DIR]
# Writes OUT_DIR/log (environment + pytest -m gpu) and OUT_DIR/mfu.jsonl (bench/mfu.py rows).
set -uo pipefail
out=${1:-${OUT:-bench/out/gpu}}
mkdir -p "$out"
if [ -d .gpuwheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpuwheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, megatron.core as m; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'megatron-core', m.__version__)"
  python3 -c "import transformer_engine" 2>/dev/null && echo "TransformerEngine: yes" || echo "TransformerEngine: no"
} 2>&1 | tee "$out/log"
timeout 240 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider -s -rs 2>&1 | tee -a "$out/log"
# Megatron's unfused attention first (the baseline of this run), then SDPA at the same and larger shapes.
for a in "--core-attention megatron" "--core-attention sdpa" "--core-attention sdpa --micro 8 --microbatches 1" \
  "--core-attention sdpa --seq 4096 --micro 2" "--core-attention sdpa --recompute selective"; do
  echo "== mfu $a" | tee -a "$out/log"
  timeout 100 python3 bench/mfu.py $a --steps 8 --warmup 3 2>>"$out/log" | tail -1 | tee -a "$out/mfu.jsonl"
done
