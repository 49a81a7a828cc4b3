#!/bin/bash
# What a lent GPU (one H100 or H200) should measure, split into calls that each fit its time: a
# session has about 15 minutes of device time in all and 10 minutes per command, so part 1 holds the
# rows OLMo-core's figures are compared with, and part 2 the ablations that say where a gain came from.
#
#   bash experiments/gpu_session.sh OUT_DIR 1          # on the GPU: card, versions, the headline rows
#   bash experiments/gpu_session.sh OUT_DIR 2          # on the GPU: the ablation rows
#   bash experiments/gpu_session.sh --cpu OUT_DIR 1    # the same calls at tiny sizes on a CPU
#
# Where ./.whl holds the wheels the GPU machine lacks (bash ../shared/tools/device-wheels.sh), they
# are installed first. Each row is stopped after ROW_TIMEOUT seconds (default 150), so one slow
# compile cannot take the call's whole time. OUT_DIR gets env.txt (card, torch, CUDA), results.jsonl
# (one line per row, see bench_h100.sh) and the profiles. Record every figure, with the card and torch
# version from env.txt and the command, in BENCHMARKS.md.
set -euo pipefail
CPU=()
if [ "${1:-}" = "--cpu" ]; then CPU=(--cpu); shift; fi
OUT=${1:?usage: gpu_session.sh [--cpu] OUT_DIR 1|2}
PART=${2:?usage: gpu_session.sh [--cpu] OUT_DIR 1|2}
case "$PART" in
  1) ROWS=(1b-bf16 1b-fp8-tensorwise 190m-bf16 1b-bf16-profiled) ;;
  2) ROWS=(1b-bf16-eager 1b-bf16-loss-unchunked 1b-bf16-ac-selective 1b-bf16-ac-budget 1b-fp8-rowwise
           190m-fp8-tensorwise 1b-fp8-profiled moe-olmoe-4-layers-bf16 1b-bf16-compile-step) ;;
  *) echo "error: part must be 1 or 2, not '$PART'" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
if [ -d .whl ] && [ "${#CPU[@]}" -eq 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
PYTHON=${PYTHON:-python3}
export PYTHON
{
  $PYTHON -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PYTHON -c "import torch; print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} > "$OUT/env.txt" 2>&1 || true
cat "$OUT/env.txt" >&2
# one inductor cache for the rows of a call: rows of the same shapes compile once
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/olmo_fn-inductor}
ROW_TIMEOUT=${ROW_TIMEOUT:-150} bash experiments/bench_h100.sh "${CPU[@]}" "$OUT" "${ROWS[@]}"
