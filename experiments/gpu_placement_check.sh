#!/bin/bash
# One-GPU check of the placement-plan overhead: bench without a plan and with a 1-rank FSDP plan
# (torchrun with one process), alternating, twice; then the float64 property suite's CPU pool is
# not needed here. Prints one JSON line per run. Run from the repository root on the GPU machine.
set -euo pipefail
ARGS="--preset olmo2-1b --seq-len 4096 --micro-batch-size 4 --steps 20 --warmup 5"
for round in 1 2; do
  echo "no plan:";         python -m olmo_fn.run bench $ARGS
  echo "1-rank FSDP plan:"; torchrun --nproc-per-node 1 -m olmo_fn.run bench $ARGS
done
