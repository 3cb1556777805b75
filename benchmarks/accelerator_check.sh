#!/usr/bin/env bash
# First run on one GPU or a TPU VM (< 8 minutes): XL/16 256² b64 and 512² b16 step time and MFU,
# bf16-vs-float32 loss agreement, cuDNN-vs-XLA attention agreement, the objective's overhead, and
# 1-step / 10-step 512² images/s. Everything runs in one process (benchmarks/accelerator_check.py);
# the log and one JSON per stage land in $OUT (default ./accelerator_check).
#
#   bash benchmarks/accelerator_check.sh                 # on the accelerator
#   bash benchmarks/accelerator_check.sh --tiny          # tiny model on CPU (what the test runs)
#   REMAT=none bash benchmarks/accelerator_check.sh      # remat policy of the train step
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-accelerator_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python benchmarks/accelerator_check.py --out-dir "$OUT" --remat "${REMAT:-nothing_saveable}" "$@" \
  2>&1 | tee "$OUT/accelerator_check.log"
