#!/usr/bin/env bash
# First run on one GPU or a TPU VM (< 8 minutes): XL/16 256² b64 and 512² b16 step time and MFU,
# bf16-vs-float32 loss agreement, cuDNN-vs-XLA attention agreement, the objective's overhead, and
# 1-step / 10-step 512² images/s. Everything runs in one process (`python -m tools.accelerator_check`,
# from the repository root); the log and one JSON per stage land in $OUT (default ./accelerator_check).
#
#   bash tools/accelerator_check.sh                 # on the accelerator
#   bash tools/accelerator_check.sh --tiny          # tiny model on CPU (what the test runs)
#   REMAT=none bash tools/accelerator_check.sh      # remat policy of the train step
#   PYTHON=venv/bin/python bash tools/accelerator_check.sh   # the interpreter (default: python)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-accelerator_check}"
mkdir -p "$OUT"
"${PYTHON:-python}" -m tools.accelerator_check --out-dir "$OUT" --remat "${REMAT:-nothing_saveable}" "$@" \
  2>&1 | tee "$OUT/accelerator_check.log"
