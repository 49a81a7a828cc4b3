#!/bin/bash
# The speed and memory comparison against OLMo-core on one H100/H200, in one go: every row is one
# `bench` run printing one JSON line (tokens_per_s, mfu, peak_mem_gib, first_step_s, ac, fp8, compile).
# OLMo-core's figures to beat (H100, torch 2.11, DESIGN.md): OLMo2-1B seq 4096 micro-batch 4 bf16
# 50,480 tokens/s, 53.1 GiB, first step 14.7 s; fp8 46,266 tokens/s; OLMo2-190M micro-batch 8 274,565.
#
#   bash experiments/bench_h100.sh [OUT_DIR] [ROW ...]        # the GPU table, or only the named rows
#   bash experiments/bench_h100.sh --cpu [OUT_DIR] [ROW ...]  # the same rows at tiny sizes, eager, on a CPU
#
# Results go to OUT_DIR (default bench-results/): results.jsonl (one line per row, with its name,
# written as each row ends, so a run cut short keeps the rows it finished; the whole table starts
# the file afresh, named rows are added to it), and
# profile-*/profile.txt for the profiled rows. ROW_TIMEOUT=S stops a row after S seconds (it is then
# recorded as failed). Run from the repository root; experiments/gpu_session.sh splits the table
# into calls that fit a lent GPU's time.
set -euo pipefail
CPU=0
if [ "${1:-}" = "--cpu" ]; then CPU=1; shift; fi
OUT=${1:-bench-results}
shift || true
ONLY=("$@")
mkdir -p "$OUT"
if [ "${#ONLY[@]}" -eq 0 ]; then : > "$OUT/results.jsonl"; else touch "$OUT/results.jsonl"; fi
PYTHON=${PYTHON:-python}

ONE_B="--preset olmo2-1b --seq-len 4096 --micro-batch-size 4 --steps 20 --warmup 5"
SMALL="--preset olmo2-190m --seq-len 4096 --micro-batch-size 8 --steps 20 --warmup 5"
# OLMoE-1B-7B cut to 4 of its 16 layers (fp32 masters and AdamW moments of all 6.9 B parameters
# would not fit one GPU): tokens/s of the MoE block as OLMoE has it, grouped GEMMs in bf16.
MOE="--preset olmoe-1b-7b --model.n-layers 4 --seq-len 4096 --micro-batch-size 4 --steps 20 --warmup 5"
ROWS=(
  "1b-bf16|$ONE_B"
  "1b-bf16-eager|$ONE_B --compile off"
  "1b-bf16-loss-unchunked|$ONE_B --loss-chunk-tokens 0"
  "1b-bf16-ac-selective|$ONE_B --ac selective"
  "1b-bf16-ac-budget|$ONE_B --ac budget --ac-budget 0.5"
  "1b-fp8-tensorwise|$ONE_B --fp8 tensorwise"
  "1b-fp8-rowwise|$ONE_B --fp8 rowwise"
  "1b-bf16-compile-step|$ONE_B --compile step"
  "190m-bf16|$SMALL"
  "190m-fp8-tensorwise|$SMALL --fp8 tensorwise"
  "1b-bf16-profiled|$ONE_B --steps 8 --warmup 3 --profile-dir $OUT/profile-1b-bf16"
  "1b-fp8-profiled|$ONE_B --steps 8 --warmup 3 --fp8 tensorwise --profile-dir $OUT/profile-1b-fp8"
  "moe-olmoe-4-layers-bf16|$MOE"
)

NAMES=" "
for row in "${ROWS[@]}"; do NAMES+="${row%%|*} "; done
for wanted in "${ONLY[@]}"; do
  case "$NAMES" in
    *" $wanted "*) ;;
    *) echo "error: no row named '$wanted'; the rows are:$NAMES" >&2; exit 2;;
  esac
done

for row in "${ROWS[@]}"; do
  name=${row%%|*}
  args=${row#*|}
  if [ "${#ONLY[@]}" -gt 0 ] && [[ " ${ONLY[*]} " != *" $name "* ]]; then continue; fi
  if [ "$CPU" = 1 ]; then
    # tiny shapes, a few steps, eager (a cold compile per row would dominate on a CPU)
    tiny=olmo2-tiny; case "$name" in moe-*) tiny=olmoe-tiny;; esac
    args=$(echo "$args" | sed -e "s/--preset [^ ]*/--preset $tiny/" -e 's/--seq-len [0-9]*/--seq-len 64/' \
      -e 's/--micro-batch-size [0-9]*/--micro-batch-size 2/' -e 's/--steps [0-9]*/--steps 3/' \
      -e 's/--warmup [0-9]*/--warmup 1/' -e 's/--compile [a-z]*//' -e 's/--ac budget --ac-budget [0-9.]*//')
    args="$args --compile off"
  fi
  echo "== $name: bench $args" >&2
  if line=$(timeout "${ROW_TIMEOUT:-0}" $PYTHON -m olmo_fn.run bench $args | tail -n 1); then
    echo "{\"row\": \"$name\", \"result\": $line}" >> "$OUT/results.jsonl"
  else
    echo "{\"row\": \"$name\", \"failed\": true}" >> "$OUT/results.jsonl"
  fi
done
echo "wrote $OUT/results.jsonl ($(wc -l < "$OUT/results.jsonl") rows in all); record the figures in BENCHMARKS.md" >&2
